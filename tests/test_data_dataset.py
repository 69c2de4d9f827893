"""Reference JSONL dataset: buckets, crops, value range, flips, bad rows (error and skip)."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from soar_ray.data.dataset import ImageCaptionDataset, collate_samples, cover_and_crop
from soar_ray.data.sampler import BucketBatchSampler
from soar_ray.data.synthetic import make_synthetic_set


def _at(jsonl: Path, line_no: int) -> str:
    """Regex for the start of an error naming `jsonl` and 1-based `line_no`."""
    return re.escape(f"{jsonl}:{line_no}: ")


def _gradient_image(width: int, height: int) -> Image.Image:
    """Red rises left to right, green top to bottom: a flip or crop shows in the values."""
    red = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    green = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([red, green, np.full_like(red, 60)], axis=-1))


def _write_set(root: Path, rows: list, images: dict[str, Image.Image]) -> tuple[Path, Path]:
    """index.jsonl from `rows` (dicts, or raw strings written verbatim) plus images as JPEGs."""
    image_dir = root / "images"
    image_dir.mkdir(exist_ok=True)
    for md5, img in images.items():
        img.save(image_dir / f"{md5}.jpg", quality=95)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    jsonl = root / "index.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl, image_dir


GOOD_ROWS = [
    {"md5": "wide", "caption_en": "a wide gradient", "bw": 64, "bh": 32},
    {"md5": "tall", "caption_en": "a tall gradient", "bw": 32, "bh": 48},
    {"md5": "small", "caption_en": "a small gradient", "bw": 32, "bh": 32},
]
GOOD_IMAGES = {"wide": (100, 40), "tall": (30, 90), "small": (10, 12)}


@pytest.fixture
def good_set(tmp_path: Path) -> tuple[Path, Path]:
    images = {md5: _gradient_image(w, h) for md5, (w, h) in GOOD_IMAGES.items()}
    return _write_set(tmp_path, GOOD_ROWS, images)


def test_cover_and_crop_hand_computed() -> None:
    # 8 x 4 image, column c has value 10 c; bucket 4 x 4: scale max(4/8, 4/4) = 1, so no resize
    # and the centre crop keeps columns 2..5.
    columns = np.arange(8, dtype=np.uint8) * 10
    img = Image.fromarray(np.tile(columns, (4, 1)), mode="L")
    assert np.array(cover_and_crop(img, 4, 4))[0].tolist() == [20, 30, 40, 50]
    # 20 x 10 to 16 x 16: scale max(0.8, 1.6) = 1.6 -> 32 x 16, cropped at x 8..24.
    assert cover_and_crop(Image.new("L", (20, 10)), 16, 16).size == (16, 16)


def test_buckets_shapes_and_range(good_set: tuple[Path, Path]) -> None:
    dataset = ImageCaptionDataset(*good_set)
    assert len(dataset) == 3
    assert dataset.buckets == [(64, 32), (32, 48), (32, 32)]
    for index, row in enumerate(GOOD_ROWS):
        sample = dataset[index]
        assert sample["md5"] == row["md5"] and sample["caption"] == row["caption_en"]
        assert sample["pixels"].shape == (3, row["bh"], row["bw"])
        assert sample["pixels"].dtype == torch.float32
        assert sample["pixels"].min() >= -1.0 and sample["pixels"].max() <= 1.0
        # The red gradient still rises left to right after resize and crop.
        red_row = sample["pixels"][0, row["bh"] // 2]
        assert red_row[-1] - red_row[0] > 0.5


def test_solid_colour_maps_to_minus_one_one(tmp_path: Path) -> None:
    rows = [{"md5": "solid", "caption_en": "magenta", "bw": 16, "bh": 16}]
    jsonl, image_dir = _write_set(
        tmp_path, rows, {"solid": Image.new("RGB", (20, 20), (255, 0, 128))}
    )
    pixels = ImageCaptionDataset(jsonl, image_dir)[0]["pixels"]
    expected = torch.tensor([1.0, -1.0, 128 / 127.5 - 1.0])[:, None, None].expand_as(pixels)
    torch.testing.assert_close(pixels, expected, atol=0.03, rtol=0)  # JPEG rounding


def test_flip_reproducible_per_sample_and_epoch(good_set: tuple[Path, Path]) -> None:
    plain = ImageCaptionDataset(*good_set)
    flipping = ImageCaptionDataset(*good_set, random_flip=True, seed=3)
    again = ImageCaptionDataset(*good_set, random_flip=True, seed=3)
    flips = []
    for epoch in range(6):
        for index in range(len(plain)):
            sample = flipping.get(index, epoch)["pixels"]
            assert torch.equal(sample, again.get(index, epoch)["pixels"])
            original = plain.get(index, epoch)["pixels"]
            flipped = torch.equal(sample, original.flip(-1))
            assert flipped or torch.equal(sample, original)
            flips.append(flipped)
    assert any(flips) and not all(flips)
    # __getitem__ follows set_epoch.
    flipping.set_epoch(4)
    assert torch.equal(flipping[1]["pixels"], flipping.get(1, 4)["pixels"])


def test_max_samples_and_caption_key(tmp_path: Path) -> None:
    rows = [{**row, "caption_zh": f"zh {row['md5']}"} for row in GOOD_ROWS]
    images = {md5: _gradient_image(w, h) for md5, (w, h) in GOOD_IMAGES.items()}
    jsonl, image_dir = _write_set(tmp_path, rows, images)
    dataset = ImageCaptionDataset(jsonl, image_dir, max_samples=2, caption_key="caption_zh")
    assert [dataset[i]["caption"] for i in range(len(dataset))] == ["zh wide", "zh tall"]
    with pytest.raises(ValueError, match=_at(jsonl, 1) + r"missing key 'caption_fr'"):
        ImageCaptionDataset(jsonl, image_dir, caption_key="caption_fr")


def test_collate_stacks_one_bucket_and_refuses_mixed(good_set: tuple[Path, Path]) -> None:
    dataset = ImageCaptionDataset(*good_set)
    batch = collate_samples([dataset[0], dataset[0]])
    assert batch["pixels"].shape == (2, 3, 32, 64) and (batch["bw"], batch["bh"]) == (64, 32)
    assert batch["md5"] == ["wide", "wide"]
    with pytest.raises(ValueError, match="mixes buckets"):
        collate_samples([dataset[0], dataset[1]])


# (row written at line 3, reason counted under skip, text the error must contain)
BAD_ROWS = [
    ('{"md5": "x", "caption_en": ', "malformed_json", "malformed JSON"),
    ("[1, 2]", "not_an_object", "expected a JSON object, got list"),
    ({"md5": "small", "bw": 32, "bh": 32}, "missing_key", "missing key 'caption_en'"),
    ({"md5": "small", "caption_en": "c", "bw": "32", "bh": 32}, "wrong_type", "'bw' must be int"),
    ({"md5": "small", "caption_en": "c", "bw": True, "bh": 32}, "wrong_type", "'bw' must be int"),
    ({"md5": "../small", "caption_en": "c", "bw": 32, "bh": 32}, "bad_md5", "not a plain file"),
    ({"md5": "small", "caption_en": "c", "bw": 0, "bh": 32}, "bad_bucket", "bucket 0x32"),
    ({"md5": "small", "caption_en": "c", "bw": 40, "bh": 32}, "bad_bucket", "multiples of 16"),
    ({"md5": "absent", "caption_en": "c", "bw": 32, "bh": 32}, "missing_image", "absent.jpg"),
    ({"md5": "notjpeg", "caption_en": "c", "bw": 32, "bh": 32}, "unreadable_image", "notjpeg.jpg"),
]


def _bad_set(root: Path, bad_rows: list) -> tuple[Path, Path]:
    """Two good rows, a blank line (still counted), then the bad rows, then a good row."""
    images = {md5: _gradient_image(w, h) for md5, (w, h) in GOOD_IMAGES.items()}
    jsonl, image_dir = _write_set(
        root, [GOOD_ROWS[0], GOOD_ROWS[1], ""] + bad_rows + [GOOD_ROWS[2]], images
    )
    (image_dir / "notjpeg.jpg").write_bytes(b"this is not an image")
    return jsonl, image_dir


@pytest.mark.parametrize(("row", "reason", "message"), BAD_ROWS, ids=[r[1] for r in BAD_ROWS])
def test_bad_row_error_names_file_and_line(tmp_path: Path, row, reason: str, message: str) -> None:
    jsonl, image_dir = _bad_set(tmp_path, [row])
    with pytest.raises(ValueError, match="^" + _at(jsonl, 4)) as info:
        ImageCaptionDataset(jsonl, image_dir)
    assert message in str(info.value)


def test_bad_rows_skip_counts_by_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    jsonl, image_dir = _bad_set(tmp_path, [row for row, _, _ in BAD_ROWS])
    with caplog.at_level(logging.INFO, logger="soar_ray.data.dataset"):
        dataset = ImageCaptionDataset(jsonl, image_dir, on_bad_sample="skip")
    assert [row.md5 for row in dataset.rows] == ["wide", "tall", "small"]
    assert [row.line_no for row in dataset.rows] == [1, 2, 4 + len(BAD_ROWS)]
    expected = {
        "malformed_json": 1,
        "not_an_object": 1,
        "missing_key": 1,
        "wrong_type": 2,
        "bad_md5": 1,
        "bad_bucket": 2,
        "missing_image": 1,
        "unreadable_image": 1,
    }
    assert dict(dataset.skipped) == expected
    assert f"{jsonl}: kept 3 rows, skipped 10 (bad_bucket=2," in caplog.text


def test_not_utf8_line_is_named(tmp_path: Path) -> None:
    jsonl, image_dir = _bad_set(tmp_path, [])
    jsonl.write_bytes(jsonl.read_bytes() + b'{"md5": "\xff"}\n')
    with pytest.raises(ValueError, match=_at(jsonl, 5) + "not UTF-8"):
        ImageCaptionDataset(jsonl, image_dir)


def test_truncated_jpeg(tmp_path: Path) -> None:
    jsonl, image_dir = _bad_set(tmp_path, [])
    # Header intact, body cut: only a full decode notices.
    path = image_dir / "tall.jpg"
    data = path.read_bytes()
    start_of_scan = data.index(b"\xff\xda")
    path.write_bytes(data[: start_of_scan + 40])
    lazy = ImageCaptionDataset(jsonl, image_dir, on_bad_sample="skip")
    assert len(lazy) == 3
    with pytest.raises(ValueError, match=_at(jsonl, 2) + r"image .*tall.jpg failed to decode"):
        lazy.get(1, epoch=0)
    verified = ImageCaptionDataset(jsonl, image_dir, on_bad_sample="skip", verify_images=True)
    assert [row.md5 for row in verified.rows] == ["wide", "small"]
    assert verified.skipped == {"unreadable_image": 1}
    with pytest.raises(ValueError, match=_at(jsonl, 2) + r"image .*tall.jpg is unreadable"):
        ImageCaptionDataset(jsonl, image_dir, verify_images=True)
    with pytest.raises(ValueError, match=r"set data.verify_images: true to find such rows"):
        lazy.get(1, epoch=0)
    # The job field reaches the dataset: the bad row is found when the dataset is built.
    from soar_ray.build import build_dataset
    from soar_ray.config import load_job

    fields = ["data.source=jsonl", f"data.jsonl={jsonl}", f"data.image_dir={image_dir}"]
    assert len(build_dataset(load_job("jobs/tiny.yaml", fields))) == 3
    job = load_job("jobs/tiny.yaml", [*fields, "data.verify_images=true"])
    with pytest.raises(ValueError, match=_at(jsonl, 2) + r"image .*tall.jpg is unreadable"):
        build_dataset(job)


def test_argument_errors(good_set: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="on_bad_sample"):
        ImageCaptionDataset(*good_set, on_bad_sample="ignore")
    with pytest.raises(ValueError, match="max_samples"):
        ImageCaptionDataset(*good_set, max_samples=0)
    # A coarser multiple makes the 48 px bucket impossible.
    with pytest.raises(ValueError, match=r":2: bucket 32x48 must be positive multiples of 32"):
        ImageCaptionDataset(*good_set, size_multiple=32)


def test_dataloader_with_bucket_sampler(tmp_path: Path) -> None:
    synthetic = make_synthetic_set(tmp_path, num_images=12)  # 6 per bucket
    dataset = ImageCaptionDataset(synthetic.jsonl_path, synthetic.image_dir)
    sampler = BucketBatchSampler(dataset.buckets, batch_size=3, rank=1, world_size=2)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples)
    batches = list(loader)
    assert len(batches) == 2  # 2 + 2 batches of 3 over 2 ranks
    for batch in batches:
        assert batch["pixels"].shape == (3, 3, batch["bh"], batch["bw"])
    assert {(b["bw"], b["bh"]) for b in batches} <= {(64, 64), (64, 48)}
