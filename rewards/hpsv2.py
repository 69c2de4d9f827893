"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023): open_clip ViT-H-14 fine-tuned on HPDv2.

Score = cos(image, prompt) of the normalised open_clip embeddings: the diagonal of
`image_features @ text_features.T` that HPSv2's `score()` reports (no logit scale), so real
scores sit around 0.2-0.35. Weights: `HPS_v2.1_compressed.pt`, a torch file holding
`{"state_dict": <open_clip ViT-H-14 state dict>}`.
"""

from __future__ import annotations

import numpy as np

from rewards.base import RewardOutput
from rewards.clip_common import OpenClipCosineReward


class HPSv2(OpenClipCosineReward):
    """HPSv2.1 reward: HPSv2's image-text cosine on its fine-tuned open_clip towers."""

    name = "hpsv2"
    CHECKPOINT_FORMAT = (
        "HPS_v2.1_compressed.pt, a torch file {'state_dict': open_clip ViT-H-14 weights}"
    )
    CHECKPOINT_SOURCE = "https://huggingface.co/xswu/HPSv2/blob/main/HPS_v2.1_compressed.pt"

    def from_cosine(self, cosine: np.ndarray) -> RewardOutput:
        """HPSv2.1 score per image: cos(image, prompt)."""
        return RewardOutput(scores=cosine)
