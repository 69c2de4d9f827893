"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023): open_clip ViT-H-14 fine-tuned on HPDv2.

Score = cos(image, prompt) of the normalised open_clip embeddings: the diagonal of
`image_features @ text_features.T` that HPSv2's `score()` reports (no logit scale), so real
scores sit around 0.2-0.35. Weights: `HPS_v2.1_compressed.pt`, a torch file holding
`{"state_dict": <open_clip ViT-H-14 state dict>}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rewards.base import (
    ImageLike,
    RewardOutput,
    check_batch,
    require_path,
    resolve_device,
    score_batches,
)
from rewards.clip_common import OpenClipTowers

CHECKPOINT_FORMAT = (
    "HPS_v2.1_compressed.pt, a torch file {'state_dict': open_clip ViT-H-14 weights}"
)
CHECKPOINT_SOURCE = "https://huggingface.co/xswu/HPSv2/blob/main/HPS_v2.1_compressed.pt"


class HPSv2:
    """HPSv2.1 reward: HPSv2's image-text cosine on its fine-tuned open_clip towers."""

    name = "hpsv2"

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
        """HPSv2.1 score per image: cos(image, prompt)."""
        check_batch(self.name, images, prompts, metadata)
        cosine = score_batches(self.name, images, prompts, self.batch_size, self.towers.cosine)
        return RewardOutput(scores=cosine)
