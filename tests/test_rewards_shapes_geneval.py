"""shapes_geneval: ground truth scores 1 at 32 and 64 px, sharp or blurred; every perturbation
scores GenEval's hand-counted fraction; blobs, colours and shapes on hand-drawn images."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

import rewards
from rewards.geneval import summarize
from rewards.geneval.rules import TAGS
from rewards.shapes_geneval import BOX_FILL, CENTROID_Y, ShapesGenEval, find_blobs
from soar_ray.data.shapes import (
    BACKGROUND,
    BAR_HEIGHT,
    PALETTE,
    SHAPES,
    Figure,
    all_rows,
    coverage,
    make_row,
    render,
    scene_for,
)

ROWS = all_rows()
ROWS_BY_TAG = {tag: [row for row in ROWS if row["tag"] == tag] for tag in TAGS}


def random_rows(num: int, seed: int) -> list[dict]:
    """`num` rows, each of a tag drawn uniformly (color_attr would swamp a uniform row draw)."""
    rng = np.random.default_rng(seed)
    picked = []
    for _ in range(num):
        rows = ROWS_BY_TAG[TAGS[rng.integers(len(TAGS))]]
        picked.append(rows[rng.integers(len(rows))])
    return picked


def score(images: list[np.ndarray], rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    out = ShapesGenEval().score(images, [row["prompt"] for row in rows], rows)
    return out.scores, out.components["geneval_strict"]


def blur(image: np.ndarray, radius: float = 1.0) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_scores_one_sharp_and_blurred(size: int) -> None:
    rows = random_rows(200, seed=size)
    rng = np.random.default_rng(size)
    images = [render(scene_for(row, rng), size) for row in rows]
    assert {row["tag"] for row in rows} == set(TAGS)
    for batch in (images, [blur(image) for image in images]):
        scores, strict = score(batch, rows)
        assert scores.tolist() == [1.0] * 200 and strict.tolist() == [1.0] * 200


# GenEval requirements per tag: single_object 1 (count), two_object 2, counting 2 (include,
# exclude), colors 2 (count, colour), position 3 (two counts, relation), color_attr 4.
# Losing one object fails its count and whatever hangs on it (its colour, the relation).
ONE_OBJECT_LOST = {
    "single_object": 0.0,
    "two_object": 1 / 2,
    "counting": 1 / 2,
    "colors": 0.0,
    "position": 1 / 3,
    "color_attr": 2 / 4,
}


def _scenes(tag: str, num: int, seed: int) -> tuple[list[dict], list[tuple[Figure, ...]]]:
    rng = np.random.default_rng(seed)
    rows = [ROWS_BY_TAG[tag][i] for i in rng.integers(len(ROWS_BY_TAG[tag]), size=num)]
    return rows, [scene_for(row, rng) for row in rows]


@pytest.mark.parametrize("tag", TAGS)
def test_missing_object(tag: str) -> None:
    rows, scenes = _scenes(tag, 10, seed=1)
    scores, strict = score([render(scene[:-1], 32) for scene in scenes], rows)
    assert scores.tolist() == pytest.approx([ONE_OBJECT_LOST[tag]] * 10) and not strict.any()


def _reshaped(scene: tuple[Figure, ...], i: int) -> tuple[Figure, ...]:
    """Object i as the next shape of SHAPES not in the scene, in its box (a bar keeps the box's
    top and width). A shape already there would leave GenEval a choice of objects."""
    present = {figure.shape for figure in scene}
    start = SHAPES.index(scene[i].shape)
    shape = next(s for s in SHAPES[start:] + SHAPES[:start] if s not in present)
    x0, y0, x1, y1 = scene[i].box
    height = (x1 - x0) * (BAR_HEIGHT if shape == "bar" else 1.0)
    return (
        *scene[:i],
        replace(scene[i], shape=shape, box=(x0, y0, x1, y0 + height)),
        *scene[i + 1 :],
    )


@pytest.mark.parametrize("tag", TAGS)
def test_wrong_shape(tag: str) -> None:
    rows, scenes = _scenes(tag, 30, seed=2)
    # A bar's box is too flat for the next shape: perturb the last object that is not a bar.
    kept = [(row, s) for row, s in zip(rows, scenes) if any(f.shape != "bar" for f in s)]
    images = []
    for _, scene in kept:
        i = max(i for i, figure in enumerate(scene) if figure.shape != "bar")
        images.append(render(_reshaped(scene, i), 32))
    scores, strict = score(images, [row for row, _ in kept])
    assert len(kept) >= 10
    assert scores.tolist() == pytest.approx([ONE_OBJECT_LOST[tag]] * len(kept))
    assert not strict.any()


@pytest.mark.parametrize(("tag", "expected"), [("colors", 1 / 2), ("color_attr", 3 / 4)])
def test_wrong_colour(tag: str, expected: float) -> None:
    rows, scenes = _scenes(tag, 20, seed=3)
    names = list(PALETTE)
    images = []
    for scene in scenes:
        color = names[(names.index(scene[0].color) + 1) % len(names)]
        images.append(render((replace(scene[0], color=color), *scene[1:]), 32))
    scores, strict = score(images, rows)
    assert scores.tolist() == pytest.approx([expected] * 20) and not strict.any()


def test_one_object_too_many_fails_counting_exclude() -> None:
    rows = [row for row in ROWS_BY_TAG["counting"] if row["include"][0]["count"] < 4]
    rng = np.random.default_rng(4)
    images = []
    for row in rows:
        clause = row["include"][0]
        more = make_row("counting", [{**clause, "count": clause["count"] + 1}])
        images.append(render(scene_for(more, rng), 32))
    scores, strict = score(images, rows)
    assert scores.tolist() == [1 / 2] * len(rows) and not strict.any()


def test_swapped_position() -> None:
    rows, scenes = _scenes("position", 30, seed=5)
    images = []
    for row, scene in zip(rows, scenes):
        # Mirror the boxes (not the shapes: a triangle stays upright) across the relation's axis.
        horizontal = row["include"][1]["position"][0] in ("left of", "right of")
        flipped = []
        for figure in scene:
            x0, y0, x1, y1 = figure.box
            box = (1 - x1, y0, 1 - x0, y1) if horizontal else (x0, 1 - y1, x1, 1 - y0)
            flipped.append(replace(figure, box=box))
        images.append(render(tuple(flipped), 32))
    scores, strict = score(images, rows)
    assert scores.tolist() == pytest.approx([2 / 3] * 30) and not strict.any()


def _canvas(size: int = 32) -> np.ndarray:
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    return image


@pytest.mark.parametrize("shape", SHAPES)
def test_template_geometry_is_the_worlds(shape: str) -> None:
    # The scorer sizes and places templates by BOX_FILL and CENTROID_Y; the world draws them.
    width = 240.0
    height = width * (BAR_HEIGHT if shape == "bar" else 1.0)
    alpha = coverage(shape, (10.0, 10.0, 10.0 + width, 10.0 + height), 260, 260).astype(float)
    rows = np.arange(260) + 0.5
    assert alpha.sum() / (width * height) == pytest.approx(BOX_FILL[shape], abs=0.01)
    centroid_y = (alpha.sum(axis=1) * rows).sum() / alpha.sum()
    assert (centroid_y - 10) / height == pytest.approx(CENTROID_Y[shape], abs=0.01)


def test_blobs_of_a_hand_drawn_image() -> None:
    image = _canvas()
    image[4:12, 4:12] = PALETTE["red"]  # an 8 px square
    image[20:24, 6:16] = PALETTE["blue"]  # a 10 x 4 bar
    image[2:4, 26:29] = PALETTE["white"]  # 6 px: under 1% of the image, speckle
    image[14:30, 18:30] = PALETTE["green"]  # a U, hollowed from the top, is none of the
    image[14:26, 22:26] = BACKGROUND[0]  # shapes (half its area off the nearest one)
    blobs = find_blobs(image)
    assert [(b.label, b.color, b.box) for b in blobs] == [
        ("square", "red", (4.0, 4.0, 12.0, 12.0)),
        ("bar", "blue", (6.0, 20.0, 16.0, 24.0)),
    ]
    assert blobs[0].error == pytest.approx(0.0, abs=1e-6)


def test_metadata_required_and_checked() -> None:
    reward = ShapesGenEval()
    image = render(scene_for(ROWS[0], np.random.default_rng(0)), 32)
    with pytest.raises(ValueError, match="prompt 'a photo of a circle' has no GenEval metadata"):
        reward.score([image], ["a photo of a circle"])
    bad_rows = [
        ({**ROWS[0], "include": [{"class": "cow", "count": 1}]}, r"include\[0\]: 'class' 'cow'"),
        ({**ROWS[0], "include": [{"class": "bar", "count": 1, "color": "pink"}]}, "'color' 'pink'"),
        ({**ROWS[0], "tag": "shapes"}, "'tag' 'shapes' is not one of"),
        ({**ROWS[0], "include": [{"class": "bar", "count": 0}]}, "'count' must be an integer"),
    ]
    for row, message in bad_rows:
        with pytest.raises(ValueError, match=message):
            reward.score([image], [row["prompt"]], [row])


def test_registered_and_summarized() -> None:
    reward = rewards.load("shapes_geneval", device="cpu", batch_size=4)
    rows = [ROWS_BY_TAG["colors"][0], ROWS_BY_TAG["counting"][0]]
    rng = np.random.default_rng(6)
    images = [render(scene_for(row, rng), 64) for row in rows]
    images[1] = render(scene_for(rows[1], rng)[:1], 64)  # one object short
    results = reward.evaluate(images, [row["prompt"] for row in rows], rows)
    assert summarize(results) == {"counting": 0.0, "colors": 1.0, "overall": 0.5}
    with pytest.raises(ValueError, match="unknown option"):
        rewards.load("shapes_geneval", detector="yolo")
