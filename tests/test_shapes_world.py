"""The shapes world: GenEval rows and wording, layouts, the held-out split, the training set."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewards.shapes_geneval import ShapesGenEval, find_blobs
from soar_ray.data.dataset import ImageCaptionDataset
from soar_ray.data.prompts import load_prompt_set
from soar_ray.data.shapes import (
    BORDER,
    MARGIN,
    PALETTE,
    SHAPES,
    TAGS,
    all_rows,
    evaluation_rows,
    make_row,
    make_shapes_set,
    make_split,
    render,
    scene_for,
)

ROWS_BY_PROMPT = {row["prompt"]: row for row in all_rows()}
GENEVAL_METADATA = (
    Path(__file__).resolve().parents[2] / "shared/data/prompts/geneval_test_metadata.jsonl"
)


def test_rows_per_tag_and_unique_prompts() -> None:
    rows = all_rows()
    counts = {tag: sum(row["tag"] == tag for row in rows) for tag in TAGS}
    # 5 shapes, 8 colours, 3 counts, 4 relations; two-object rows name two different shapes and
    # color_attr two different colours too: 5*4 ordered pairs, and 5*8 * 4*7.
    assert counts == {
        "single_object": 5,
        "two_object": 20,
        "counting": 15,
        "colors": 40,
        "position": 80,
        "color_attr": 1120,
    }
    assert len({row["prompt"] for row in rows}) == len(rows)


def test_geneval_wording_and_layout() -> None:
    rows = ROWS_BY_PROMPT
    assert rows["a photo of three crosses"] == {
        "tag": "counting",
        "include": [{"class": "cross", "count": 3}],
        "exclude": [{"class": "cross", "count": 4}],
        "prompt": "a photo of three crosses",
    }
    # GenEval: "a photo of a cow right of a laptop" names the laptop first in `include`.
    assert rows["a photo of a circle right of a bar"]["include"] == [
        {"class": "bar", "count": 1},
        {"class": "circle", "count": 1, "position": ["right of", 0]},
    ]
    assert rows["a photo of an orange cross and a white bar"]["include"] == [
        {"class": "cross", "count": 1, "color": "orange"},
        {"class": "bar", "count": 1, "color": "white"},
    ]
    assert {"a photo of a triangle", "a photo of a green square", "a photo of a bar and a circle",
            "a photo of two bars", "a photo of a square below a triangle"} <= set(rows)  # fmt: skip
    assert list(rows["a photo of a bar"]) == ["tag", "include", "prompt"]
    with pytest.raises(ValueError, match="tag 'counted' is not one of"):
        make_row("counted", [{"class": "bar", "count": 2}])


@pytest.mark.skipif(not GENEVAL_METADATA.is_file(), reason="GenEval metadata not in shared/")
def test_same_keys_and_wording_as_geneval() -> None:
    geneval = [json.loads(line) for line in GENEVAL_METADATA.read_text().splitlines()]
    ours = all_rows()
    for tag in TAGS:
        theirs = next(row for row in geneval if row["tag"] == tag)
        mine = next(row for row in ours if row["tag"] == tag)
        assert list(mine) == list(theirs)
        assert [list(c) for c in mine["include"]] == [list(c) for c in theirs["include"]]

    # The same templates: prompts with class and colour names replaced by placeholders.
    def template(row: dict) -> str:
        text = row["prompt"]
        for clause in row["include"]:
            text = re.sub(rf"\b{clause['class']}(e?s)?\b", "OBJ", text)
            text = re.sub(rf"\b{clause.get('color')}\b", "COLOR", text)
        return re.sub(r"\ban\b", "a", text)

    assert {template(row) for row in ours} <= {template(row) for row in geneval}


def test_scenes_are_deterministic_apart_and_inside() -> None:
    rng = np.random.default_rng(3)
    rows = all_rows()
    for _ in range(200):
        row = rows[rng.integers(len(rows))]
        seed = int(rng.integers(1 << 30))
        scene = scene_for(row, np.random.default_rng(seed))
        assert scene == scene_for(row, np.random.default_rng(seed))
        assert len(scene) == sum(clause["count"] for clause in row["include"])
        for i, figure in enumerate(scene):
            x0, y0, x1, y1 = figure.box
            assert BORDER <= x0 < x1 <= 1 - BORDER and BORDER <= y0 < y1 <= 1 - BORDER
            for other in scene[:i]:
                gap = max(
                    other.box[0] - x1, x0 - other.box[2], other.box[1] - y1, y0 - other.box[3]
                )
                assert gap >= MARGIN
    image = render(scene, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.array_equal(image[0, 0], [128, 128, 128])


def test_split_seeds_differ_and_held_out_rows_mix_one_unseen() -> None:
    splits = [make_split(seed) for seed in range(6)]
    assert len({split.held_out for split in splits}) == 6
    split = splits[0]
    # 1 colour per shape, 1 shape per count, 2 shape pairs.
    assert [sum(c[0] == kind for c in split.held_out) for kind in ("color", "count", "pair")] == [
        5,
        3,
        2,
    ]
    seen, held_out = evaluation_rows(split, num_per_tag=4, seed=1)
    assert all(split.num_held_out(row) == 0 for row in seen)
    assert all(split.num_held_out(row) == 1 for row in held_out)
    assert {row["tag"] for row in seen} == set(TAGS)
    assert {row["tag"] for row in held_out} == set(TAGS) - {"single_object"}
    for shape in SHAPES:  # a colour is held out of at most one shape at this size
        assert len(split.colors_for(shape)) == len(PALETTE) - 1
    with pytest.raises(ValueError, match="colors_per_shape must be in"):
        make_split(0, colors_per_shape=5)


def _held_out_phrases(held_out: frozenset) -> list[str]:
    words = {2: "two", 3: "three", 4: "four"}
    return [
        f"{c[1]} {c[2]}" if c[0] == "color" else f"{words[c[1]]} {c[2]}"
        for c in held_out
        if c[0] != "pair"
    ]


def test_training_set_holds_no_held_out_composition(tmp_path: Path) -> None:
    split = make_split(7)
    shapes_set = make_shapes_set(tmp_path, 120, split, image_size=32, seed=2, num_eval_per_tag=3)
    dataset = ImageCaptionDataset(shapes_set.jsonl_path, shapes_set.image_dir, verify_images=True)
    assert len(dataset) == 120 and set(dataset.buckets) == {(32, 32)}
    phrases = _held_out_phrases(split.held_out)
    pairs = [c[1:] for c in split.held_out if c[0] == "pair"]
    assert len(phrases) == 8 and len(pairs) == 2
    for row in dataset.rows:
        assert not any(phrase in row.caption for phrase in phrases), row.caption
        named = {shape for shape in SHAPES if re.search(rf"\b{shape}(e?s)?\b", row.caption)}
        assert not any({a, b} <= named for a, b in pairs), row.caption
    # Every image (a q95 JPEG) shows its caption, and none a held-out colour on a shape.
    images = [Image.open(row.image_path) for row in dataset.rows]
    metadata = [ROWS_BY_PROMPT[row.caption] for row in dataset.rows]
    scores = ShapesGenEval().score(images, [row.caption for row in dataset.rows], metadata).scores
    assert scores.tolist() == [1.0] * 120
    for image in images:
        for blob in find_blobs(image):
            assert ("color", blob.color, blob.label) not in split.held_out


def test_prompt_files_load_as_geneval_and_writing_is_idempotent(tmp_path: Path) -> None:
    split = make_split(1)
    shapes_set = make_shapes_set(tmp_path, 8, split, num_eval_per_tag=2)
    train = load_prompt_set(shapes_set.train_prompts, "geneval")
    assert [p.metadata for p in train] == split.training_rows
    assert all(p.text == p.metadata["prompt"] for p in train)
    seen, held_out = evaluation_rows(split, num_per_tag=2, seed=0)
    assert [p.metadata for p in load_prompt_set(shapes_set.eval_seen, "geneval")] == seen
    assert [p.metadata for p in load_prompt_set(shapes_set.eval_held_out, "geneval")] == held_out
    stamps = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    assert make_shapes_set(tmp_path, 8, split, num_eval_per_tag=2) == shapes_set
    assert stamps == {
        path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()
    }
    shapes_set.eval_seen.unlink()  # incomplete: rebuilt
    make_shapes_set(tmp_path, 8, split, num_eval_per_tag=2)
    assert shapes_set.eval_seen.is_file()
    make_shapes_set(tmp_path, 5, make_split(2), num_eval_per_tag=2)  # other settings: rebuilt
    assert len(list(shapes_set.image_dir.glob("*.jpg"))) == 5
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 16"):
        make_shapes_set(tmp_path, 8, split, image_size=40)
