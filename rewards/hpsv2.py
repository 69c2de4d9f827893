"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023): open_clip ViT-H-14 fine-tuned on HPDv2.

Score = cos(image, prompt) of the normalised open_clip embeddings: the diagonal of
`image_features @ text_features.T` that HPSv2's `score()` reports (no logit scale), so real
scores sit around 0.2-0.35. Images go through HPSv2's own eval transform (img_score.py builds it
with `light_augmentation=True`): the longest side resized to 224 and the image padded to a square
with black, not open_clip's shortest-side resize and centre crop, so a non-square image keeps its
whole content (clip_common.pad_longest_transform). HPSv2 runs the towers under fp16 autocast on
GPU; here they run in float32. Weights: `HPS_v2.1_compressed.pt`, a torch file holding
`{"state_dict": <open_clip ViT-H-14 state dict>}`.
"""

from __future__ import annotations

import numpy as np

from rewards.base import RewardOutput
from rewards.clip_common import OpenClipCosineReward, pad_longest_transform


class HPSv2(OpenClipCosineReward):
    """HPSv2.1 reward: HPSv2's image-text cosine on its fine-tuned open_clip towers."""

    name = "hpsv2"
    checkpoint_format = (
        "HPS_v2.1_compressed.pt, a torch file {'state_dict': open_clip ViT-H-14 weights}"
    )
    checkpoint_source = "https://huggingface.co/xswu/HPSv2/blob/main/HPS_v2.1_compressed.pt"
    transform = staticmethod(pad_longest_transform)

    def from_cosine(self, cosine: np.ndarray) -> RewardOutput:
        """HPSv2.1 score per image: cos(image, prompt)."""
        return RewardOutput(scores=cosine)
