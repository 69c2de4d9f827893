"""JPEG compressibility and incompressibility, the cheap rewards of DDPO (Black et al., "Training
Diffusion Models with Reinforcement Learning", arXiv 2305.13301): the image, as RGB, is encoded
by PIL as JPEG at quality 95 and its size taken in kB (bytes / 1000, DDPO's `buffer.tell() /
1000`); `jpeg_compressibility` scores minus that size, `jpeg_incompressibility` plus it. Only the
pixels count (no metadata of an opened file is written); prompts play no part. The score is the
size itself, so there are no components (both rewards can be scored on one batch). No model, so
nothing is downloaded; encoding runs on CPU whatever the device.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from rewards.base import ImageLike, RewardOutput, check_batch, check_batch_size, score_batches

JPEG_QUALITY = 95


def jpeg_kb(image: Image.Image) -> float:
    """Size in kB (1000 bytes) of the RGB pixels encoded by PIL as JPEG at quality 95.

    Only the pixels count: a fresh image is encoded, as DDPO encodes its uint8 arrays, so what
    an opened file carries in `info` (a JPEG comment, EXIF, an ICC profile) adds no bytes.
    """
    pixels = Image.fromarray(np.asarray(image.convert("RGB")))
    buffer = io.BytesIO()
    pixels.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000


def check_device(reward: str, device: str) -> str:
    """`device` if it is 'auto', 'cpu', 'cuda' or 'cuda:N', else an error naming the reward."""
    if device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and device.removeprefix("cuda:").isdigit()
    ):
        return device
    raise ValueError(f"{reward}: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class JpegSize:
    """sign * (JPEG q95 size in kB); a subclass sets the name and the sign."""

    name: str
    sign: float

    def __init__(
        self,
        device: str = "auto",  # common option; JPEG encoding runs on CPU whatever it says
        batch_size: int = 16,  # images converted to RGB at a time
    ) -> None:
        check_device(self.name, device)
        self.batch_size = check_batch_size(self.name, batch_size)

    def _sizes(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """JPEG size in kB [B]; prompts play no part."""
        return np.array([jpeg_kb(image) for image in images])

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """sign * JPEG size in kB per image."""
        check_batch(self.name, images, prompts, metadata)
        kb = score_batches(self.name, images, prompts, self.batch_size, self._sizes)
        return RewardOutput(self.sign * kb)


class JpegCompressibility(JpegSize):
    """DDPO's JPEG compressibility: minus the JPEG q95 size in kB (smaller files score higher)."""

    name = "jpeg_compressibility"
    sign = -1.0


class JpegIncompressibility(JpegSize):
    """DDPO's JPEG incompressibility: the JPEG q95 size in kB (larger files score higher)."""

    name = "jpeg_incompressibility"
    sign = 1.0
