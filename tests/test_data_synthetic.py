"""Synthetic captioned set: fast, deterministic, idempotent, captions that match the pixels."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soar_ray.data.dataset import ImageCaptionDataset
from soar_ray.data.synthetic import COLOURS, SHAPES, WORDS, make_synthetic_set

SHAPE_CAPTION = re.compile(rf"an? (\w+) ({'|'.join(SHAPES)}) on an? (\w+) background")
SIGN_CAPTION = re.compile(rf'a sign that says "({"|".join(WORDS)})"')


NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[name] for name in NAMES], dtype=float)


def _nearest_colours(rgb_N3: np.ndarray) -> list[str]:
    """Palette name nearest to each RGB row."""
    distances = ((rgb_N3[:, None, :] - PALETTE[None]) ** 2).sum(-1)
    return [NAMES[i] for i in distances.argmin(axis=1)]


def _nearest_colour(rgb: np.ndarray) -> str:
    return _nearest_colours(rgb[None])[0]


def test_loadable_with_buckets(tmp_path: Path) -> None:
    # Speed is a benchmark matter (about 0.2 s for 256 images here), not a test assertion.
    synthetic = make_synthetic_set(tmp_path, num_images=256)
    dataset = ImageCaptionDataset(synthetic.jsonl_path, synthetic.image_dir, verify_images=True)
    assert len(dataset) == 256 and not dataset.skipped
    assert sorted(set(dataset.buckets)) == [(64, 48), (64, 64)]
    assert len({row.md5 for row in dataset.rows}) == 256
    num_signs = sum(bool(SIGN_CAPTION.fullmatch(row.caption)) for row in dataset.rows)
    num_shapes = sum(bool(SHAPE_CAPTION.fullmatch(row.caption)) for row in dataset.rows)
    assert num_signs + num_shapes == 256 and 30 < num_signs < 100  # sign_fraction 0.25
    sample = dataset[1]
    assert sample["pixels"].shape == (3, 48, 64)


def test_captions_describe_the_pixels(tmp_path: Path) -> None:
    synthetic = make_synthetic_set(tmp_path, num_images=40, seed=5)
    for line in synthetic.jsonl_path.read_text().splitlines():
        row = json.loads(line)
        pixels = np.asarray(Image.open(synthetic.image_dir / f"{row['md5']}.jpg"), dtype=float)
        assert pixels.shape == (row["bh"], row["bw"], 3)
        match = SHAPE_CAPTION.fullmatch(row["caption_en"])
        if match is None:  # a sign: white plate with dark text in the middle
            centre_row = pixels[row["bh"] // 2]
            assert _nearest_colour(centre_row.max(axis=0)) == "white"
            assert _nearest_colour(centre_row.min(axis=0)) == "black"
            continue
        fg, shape, bg = match.groups()
        # The shape lies within its radius of a centre at least a radius from the border, so
        # the corner is background; the shape's colour covers a good part of the image.
        assert _nearest_colour(pixels[0, 0]) == bg
        names = _nearest_colours(pixels.reshape(-1, 3))
        assert names.count(fg) > len(names) * 0.05, (row, shape)


def test_deterministic_from_seed(tmp_path: Path) -> None:
    first = make_synthetic_set(tmp_path / "a", num_images=12, seed=1)
    second = make_synthetic_set(tmp_path / "b", num_images=12, seed=1)
    other = make_synthetic_set(tmp_path / "c", num_images=12, seed=2)
    assert first.jsonl_path.read_text() == second.jsonl_path.read_text()
    assert first.jsonl_path.read_text() != other.jsonl_path.read_text()
    for path in first.image_dir.iterdir():
        assert path.read_bytes() == (second.image_dir / path.name).read_bytes()


def test_idempotent_and_partial_rebuilt(tmp_path: Path) -> None:
    synthetic = make_synthetic_set(tmp_path, num_images=8)
    stamps = {p.name: p.stat().st_mtime_ns for p in synthetic.image_dir.iterdir()}
    index_stamp = synthetic.jsonl_path.stat().st_mtime_ns
    make_synthetic_set(tmp_path, num_images=8)  # complete: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in synthetic.image_dir.iterdir()} == stamps
    assert synthetic.jsonl_path.stat().st_mtime_ns == index_stamp
    expected = synthetic.jsonl_path.read_text()
    victim = sorted(synthetic.image_dir.iterdir())[3]
    victim.unlink()
    (synthetic.image_dir / "stray.jpg").write_bytes(b"left over")
    make_synthetic_set(tmp_path, num_images=8)  # partial: rebuilt to the same content
    assert victim.is_file() and not (synthetic.image_dir / "stray.jpg").exists()
    assert synthetic.jsonl_path.read_text() == expected
    resized = make_synthetic_set(tmp_path, num_images=5)  # other settings: rebuilt
    assert len(resized.jsonl_path.read_text().splitlines()) == 5
    assert len(list(resized.image_dir.iterdir())) == 5


def test_bad_settings_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        make_synthetic_set(tmp_path, buckets=((64, 40),))
    with pytest.raises(ValueError, match="num_images must be positive"):
        make_synthetic_set(tmp_path, num_images=0)
    with pytest.raises(ValueError, match="sign_fraction"):
        make_synthetic_set(tmp_path, sign_fraction=1.5)
