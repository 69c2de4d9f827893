"""CLIPScore (Hessel et al. 2021, eq. 1) on open_clip ViT-H-14 (LAION-2B, laion2b_s32b_b79k).

CLIPScore(image, prompt) = w * max(cos(E_image, E_prompt), 0) with w = 2.5, the paper's rescaling
so that scores spread over roughly [0, 1]; the raw cosine is kept as component "clip_cosine".
The paper prefixes image captions with "A photo depicts"; prompts here are scored as given.
Weights: `open_clip_pytorch_model.bin` of the open_clip ViT-H-14 LAION-2B release.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rewards.base import (
    ImageLike,
    RewardOutput,
    check_batch,
    require_path,
    resolve_device,
    score_batches,
)
from rewards.clip_common import OpenClipTowers

CLIPSCORE_WEIGHT = 2.5  # w of CLIPScore eq. 1
CHECKPOINT_FORMAT = "open_clip_pytorch_model.bin, the open_clip ViT-H-14 state dict"
CHECKPOINT_SOURCE = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class CLIPScore:
    """CLIPScore reward: 2.5 * max(cos(image, prompt), 0)."""

    name = "clipscore"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_name: str = "ViT-H-14",
        device: str = "auto",
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        path = require_path(
            checkpoint,
            reward=self.name,
            option="checkpoint",
            expected=CHECKPOINT_FORMAT,
            source=CHECKPOINT_SOURCE,
        )
        self.towers = OpenClipTowers(
            reward=self.name, model_name=model_name, checkpoint=path, device=resolve_device(device)
        )
        self.batch_size = batch_size

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """CLIPScore per image, with the raw cosine as component "clip_cosine"."""
        check_batch(self.name, images, prompts, metadata)
        cosine = score_batches(self.name, images, prompts, self.batch_size, self.towers.cosine)
        scores = CLIPSCORE_WEIGHT * np.maximum(cosine, 0.0)
        return RewardOutput(scores=scores, components={"clip_cosine": cosine})
