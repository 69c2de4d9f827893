"""Run metrics: a JSONL log, TensorBoard event files and sample-image grids in the run folder."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


class MetricsLogger:
    """Writes one JSON object per step to `metrics.jsonl` and scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered so a crashed run keeps every step it finished.
        self._jsonl = None
        if jsonl:
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` for `step`; non-finite losses are kept as they are (null in JSON)."""
        record = {"step": step, "time": time.time(), **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_jsonable(record)) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def log_image(self, tag: str, path: str | Path, step: int) -> None:
        """Add a saved PNG to TensorBoard's image tab."""
        if self._tb is not None:
            array = np.asarray(Image.open(path).convert("RGB"))
            self._tb.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def to_uint8_images(pixels_BCHW: torch.Tensor) -> np.ndarray:
    """Map decoded pixels in [-1, 1] to uint8 HWC arrays, shape [B, H, W, 3]."""
    pixels = ((pixels_BCHW.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(
    images_BHWC: np.ndarray,
    path: str | Path,
    *,
    captions: list[str] | None = None,
    num_columns: int | None = None,
    min_tile: int = 128,
) -> Path:
    """Save images as one PNG grid, each tile upscaled to `min_tile` px with its caption below."""
    num_images = len(images_BHWC)
    if num_images == 0:
        raise ValueError("save_image_grid: no images to save")
    if captions is not None and len(captions) != num_images:
        raise ValueError(f"save_image_grid: {num_images} images but {len(captions)} captions")
    num_columns = num_columns or math.ceil(math.sqrt(num_images))
    num_rows = math.ceil(num_images / num_columns)
    height, width = images_BHWC.shape[1:3]
    scale = max(1, math.ceil(min_tile / max(height, width)))
    tile_w, tile_h = width * scale, height * scale
    text_h = 24 if captions else 0
    grid = Image.new("RGB", (num_columns * tile_w, num_rows * (tile_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, image in enumerate(images_BHWC):
        x, y = (i % num_columns) * tile_w, (i // num_columns) * (tile_h + text_h)
        tile = Image.fromarray(image).resize((tile_w, tile_h), Image.NEAREST)
        grid.paste(tile, (x, y))
        if captions:
            draw.text(
                (x + 2, y + tile_h + 4), _fit(draw, captions[i], font, tile_w - 4), "black", font
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
