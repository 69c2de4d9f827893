"""CLIPScore: an image-prompt CLIP cosine, rescaled; two variants that differ in model and formula.

- `variant="hessel"` (default): CLIPScore of Hessel et al. 2021, eq. 1, on open_clip ViT-H-14
  (LAION-2B, laion2b_s32b_b79k): w * max(cos, 0) with w = 2.5, the paper's rescaling so that
  scores spread over roughly [0, 1]. The paper prefixes captions with "A photo depicts"; prompts
  here are scored as given. Weights: `open_clip_pytorch_model.bin` of the LAION release.
- `variant="flow_grpo"`: Flow-GRPO's `clipscore` reward (flow_grpo/clip_scorer.py), OpenAI CLIP
  ViT-L/14: its `logits_per_image` diagonal / 30, i.e. exp(logit_scale) * cos / 30 = 100 * cos / 30
  (no clipping at 0), with its image transform (shortest side bilinear-resized to 224, centre crop;
  clip_common.shortest_side_transform). Architecture `ViT-L-14-quickgelu` (OpenAI's weights were
  trained with QuickGELU); weights: `open_clip_pytorch_model.bin` of
  timm/vit_large_patch14_clip_224.openai, the weights Flow-GRPO loads from openai/clip-vit-large-patch14.
The two variants' scores are not comparable. The raw cosine is kept as component "clip_cosine".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rewards.base import RewardOutput
from rewards.clip_common import OpenClipCosineReward, shortest_side_transform

CLIPSCORE_WEIGHT = 2.5  # w of CLIPScore eq. 1
FLOW_GRPO_DIVISOR = 30.0  # Flow-GRPO divides CLIP's logits by 30
VARIANTS = {
    # variant: (default architecture, checkpoint file, where it comes from)
    "hessel": (
        "ViT-H-14",
        "open_clip_pytorch_model.bin, the open_clip ViT-H-14 state dict",
        "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ),
    "flow_grpo": (
        "ViT-L-14-quickgelu",
        "open_clip_pytorch_model.bin, the OpenAI CLIP ViT-L/14 open_clip state dict",
        "https://huggingface.co/timm/vit_large_patch14_clip_224.openai",
    ),
}


def hessel_clipscore(cosine: np.ndarray) -> np.ndarray:
    """2.5 * max(cos, 0) (Hessel et al. 2021, eq. 1)."""
    return CLIPSCORE_WEIGHT * np.maximum(cosine, 0.0)


def flow_grpo_clipscore(cosine: np.ndarray, logit_scale: float) -> np.ndarray:
    """exp(logit_scale) * cos / 30, Flow-GRPO's CLIP score (logit_scale given already exp'd)."""
    return logit_scale * np.asarray(cosine) / FLOW_GRPO_DIVISOR


class CLIPScore(OpenClipCosineReward):
    """CLIPScore reward: 2.5 * max(cos, 0) ("hessel") or 100 * cos / 30 ("flow_grpo")."""

    name = "clipscore"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_name: str | None = None,  # None: the variant's architecture (VARIANTS)
        device: str = "auto",
        batch_size: int = 16,
        variant: str = "hessel",  # "hessel" (CLIPScore paper) or "flow_grpo" (Flow-GRPO's reward)
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(
                f"clipscore: variant must be one of {sorted(VARIANTS)}, got {variant!r}"
            )
        self.variant = variant
        default_model, self.checkpoint_format, self.checkpoint_source = VARIANTS[variant]
        self.transform = shortest_side_transform if variant == "flow_grpo" else None
        super().__init__(checkpoint, model_name or default_model, device, batch_size)

    def from_cosine(self, cosine: np.ndarray) -> RewardOutput:
        """The variant's score per image, with the raw cosine as component "clip_cosine"."""
        if self.variant == "flow_grpo":
            scores = flow_grpo_clipscore(cosine, self.towers.logit_scale)
        else:
            scores = hessel_clipscore(cosine)
        return RewardOutput(scores=scores, components={"clip_cosine": cosine})
