"""CLIPScore (Hessel et al. 2021, eq. 1) on open_clip ViT-H-14 (LAION-2B, laion2b_s32b_b79k).

CLIPScore(image, prompt) = w * max(cos(E_image, E_prompt), 0) with w = 2.5, the paper's rescaling
so that scores spread over roughly [0, 1]; the raw cosine is kept as component "clip_cosine".
The paper prefixes image captions with "A photo depicts"; prompts here are scored as given.
Weights: `open_clip_pytorch_model.bin` of the open_clip ViT-H-14 LAION-2B release.
"""

from __future__ import annotations

import numpy as np

from rewards.base import RewardOutput
from rewards.clip_common import OpenClipCosineReward

CLIPSCORE_WEIGHT = 2.5  # w of CLIPScore eq. 1


class CLIPScore(OpenClipCosineReward):
    """CLIPScore reward: 2.5 * max(cos(image, prompt), 0)."""

    name = "clipscore"
    CHECKPOINT_FORMAT = "open_clip_pytorch_model.bin, the open_clip ViT-H-14 state dict"
    CHECKPOINT_SOURCE = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def from_cosine(self, cosine: np.ndarray) -> RewardOutput:
        """CLIPScore per image, with the raw cosine as component "clip_cosine"."""
        scores = CLIPSCORE_WEIGHT * np.maximum(cosine, 0.0)
        return RewardOutput(scores=scores, components={"clip_cosine": cosine})
