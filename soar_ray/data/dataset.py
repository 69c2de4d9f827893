"""Reference JSONL image-caption dataset with resolution buckets.

Format: one JSON object per line, `{"md5": str, "caption_en": str, "bw": int, "bh": int}`, the
image at `image_dir/{md5}.jpg`; (bw, bh) is the bucket, in pixels, that the image is resized to
(aspect kept, covering the bucket) and centre-cropped to. Blank lines are ignored.

Bad rows: every row is checked while the index is built (JSON, keys, types, bucket positive and a
multiple of `size_multiple`, image file present and its header readable). `on_bad_sample="error"`
raises a ValueError naming the file, the 1-based line and the problem; `"skip"` drops the row,
counts it by reason in `skipped` and logs a one-line summary. `build_index(open_images=False)`
checks the rows and that their images exist without opening any: the quick check `soar-ray run`
makes before Ray starts.

Corrupt image data (design choice): a header check cannot see a truncated or damaged JPEG body.
With `verify_images=True` (`data.verify_images: true` in a job) every image is fully decoded
while the index is built, so such rows are reported or skipped there and loading never meets
them. Without it, an image that fails to decode at load time is always a ValueError naming file
and line, whatever `on_bad_sample` says: dropping it at that point would silently shrink a batch
and could put data-parallel ranks out of step, and a placeholder image would train on garbage.
"""

import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

BAD_SAMPLE_MODES = ("error", "skip")
# Exceptions PIL raises for unreadable, truncated or hostile image files.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Row:
    """One validated index row; `line_no` is 1-based in `jsonl_path`."""

    md5: str
    caption: str
    bw: int
    bh: int
    image_path: Path
    line_no: int


class _BadRow(Exception):
    """A row that failed validation; `reason` is the category it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_image(path: Path, full_decode: bool) -> None:
    """Open the image header (and decode the whole body when `full_decode`)."""
    try:
        with Image.open(path) as img:
            if full_decode:
                img.load()
    except IMAGE_ERRORS as e:
        raise _BadRow("unreadable_image", f"image {path} is unreadable ({e})") from e


def _parse_row(
    raw: bytes, image_dir: Path, caption_key: str, size_multiple: int, open_images: bool,
    verify_images: bool,
) -> tuple[str, str, int, int, Path]:  # fmt: skip
    """Validate one JSONL line; returns (md5, caption, bw, bh, image_path) or raises _BadRow."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRow("bad_encoding", f"not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadRow("malformed_json", f"malformed JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise _BadRow("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    for key, expected in (("md5", str), (caption_key, str), ("bw", int), ("bh", int)):
        if key not in obj:
            raise _BadRow("missing_key", f"missing key {key!r}")
        value = obj[key]
        if not isinstance(value, expected) or isinstance(value, bool):
            got = type(value).__name__
            raise _BadRow("wrong_type", f"key {key!r} must be {expected.__name__}, got {got}")
    md5, bw, bh = obj["md5"], obj["bw"], obj["bh"]
    if md5 in ("", ".", "..") or Path(md5).name != md5:
        raise _BadRow("bad_md5", f"md5 {md5!r} is not a plain file name")
    if bw <= 0 or bh <= 0 or bw % size_multiple or bh % size_multiple:
        raise _BadRow(
            "bad_bucket", f"bucket {bw}x{bh} must be positive multiples of {size_multiple} px"
        )
    image_path = image_dir / f"{md5}.jpg"
    if not image_path.is_file():
        raise _BadRow("missing_image", f"image {image_path} does not exist")
    if open_images:
        _check_image(image_path, full_decode=verify_images)
    return md5, obj[caption_key], bw, bh, image_path


def build_index(
    jsonl_path: Path,
    image_dir: Path,
    *,
    size_multiple: int = 16,
    on_bad_sample: str = "error",
    open_images: bool = True,
    verify_images: bool = False,
    max_samples: int | None = None,
    caption_key: str = "caption_en",
) -> tuple[list[Row], Counter[str]]:
    """Read and validate the JSONL index; returns the kept rows and skip counts by reason.
    `open_images=False` leaves image headers (and `verify_images`) unchecked."""
    if on_bad_sample not in BAD_SAMPLE_MODES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_MODES}, got {on_bad_sample!r}")
    if size_multiple <= 0:
        raise ValueError(f"size_multiple must be positive, got {size_multiple}")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be positive or None, got {max_samples}")
    rows: list[Row] = []
    skipped: Counter[str] = Counter()
    with open(jsonl_path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if max_samples is not None and len(rows) == max_samples:
                break
            if not raw.strip():
                continue
            try:
                fields = _parse_row(raw, image_dir, caption_key, size_multiple, open_images,
                                    verify_images)  # fmt: skip
            except _BadRow as bad:
                if on_bad_sample == "error":
                    raise ValueError(f"{jsonl_path}:{line_no}: {bad}") from bad
                skipped[bad.reason] += 1
                continue
            rows.append(Row(*fields, line_no=line_no))
    summary = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items()))
    logger.log(
        logging.WARNING if skipped else logging.INFO,
        "%s: kept %d rows, skipped %d%s",
        jsonl_path,
        len(rows),
        skipped.total(),
        f" ({summary})" if summary else "",
    )
    return rows, skipped


def cover_and_crop(img: Image.Image, bw: int, bh: int) -> Image.Image:
    """Resize keeping the aspect ratio so the image covers bw x bh, then centre-crop to it."""
    w, h = img.size
    scale = max(bw / w, bh / h)
    new_w, new_h = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (new_w, new_h) != (w, h):
        # Lanczos keeps downscaled detail (text, edges) better than bilinear.
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - bw) // 2, (new_h - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def flip_draw(seed: int, epoch: int, md5: str) -> bool:
    """Whether sample `md5` is flipped in `epoch`: a fixed coin per (seed, epoch, sample)."""
    return bool(np.random.default_rng([seed, epoch, zlib.crc32(md5.encode())]).random() < 0.5)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Reference-format images resized and centre-cropped to their bucket, pixels in [-1, 1]."""

    def __init__(
        self,
        jsonl_path: str | Path,
        image_dir: str | Path,
        *,
        size_multiple: int = 16,
        on_bad_sample: str = "error",
        verify_images: bool = False,
        max_samples: int | None = None,
        caption_key: str = "caption_en",
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.jsonl_path, self.image_dir = Path(jsonl_path), Path(image_dir)
        self.rows, self.skipped = build_index(
            self.jsonl_path,
            self.image_dir,
            size_multiple=size_multiple,
            on_bad_sample=on_bad_sample,
            verify_images=verify_images,
            max_samples=max_samples,
            caption_key=caption_key,
        )
        self.random_flip = random_flip
        self.seed = seed
        # Epoch used by __getitem__ (the DataLoader path); `get` takes it explicitly.
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The (bw, bh) bucket of every index, for BucketBatchSampler."""
        return [(row.bw, row.bh) for row in self.rows]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips __getitem__ draws."""
        self.epoch = epoch

    def get(self, index: int, epoch: int) -> dict[str, Any]:
        """Sample `index` as seen in `epoch`: md5, caption, bw, bh and pixels [3, bh, bw]."""
        row = self.rows[index]
        try:
            with Image.open(row.image_path) as img:
                img = img.convert("RGB")
        except IMAGE_ERRORS as e:
            raise ValueError(
                f"{self.jsonl_path}:{row.line_no}: image {row.image_path} failed to decode ({e}); "
                "set data.verify_images: true to find such rows before training starts"
            ) from e
        img = cover_and_crop(img, row.bw, row.bh)
        if self.random_flip and flip_draw(self.seed, epoch, row.md5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels_CHW = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return {
            "md5": row.md5,
            "caption": row.caption,
            "bw": row.bw,
            "bh": row.bh,
            "pixels": pixels_CHW.float() / 127.5 - 1.0,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index, self.epoch)


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of one bucket into a batch: tensors batch-first, cond dicts per key."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    buckets = sorted({(s["bw"], s["bh"]) for s in samples})
    if len(buckets) != 1:
        raise ValueError(f"batch mixes buckets {buckets}; sample with BucketBatchSampler")
    bw, bh = buckets[0]
    batch: dict[str, Any] = {
        "md5": [s["md5"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "bw": bw,
        "bh": bh,
    }
    for key, value in samples[0].items():
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([s[key] for s in samples])
        elif isinstance(value, dict):
            batch[key] = {k: torch.stack([s[key][k] for s in samples]) for k in value}
    return batch
