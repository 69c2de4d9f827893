"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE").

Score = MLP(e / |e|) where e is the CLIP ViT-L/14 image embedding (the projected image feature
of OpenAI CLIP) and MLP is the predictor's linear stack (no activations, dropout inactive at
inference). Real scores sit roughly in 1-10 (a mean rating). Files: the transformers folder of
openai/clip-vit-large-patch14 (CLIPModel + CLIPImageProcessor) and the predictor's state dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor

from rewards.base import (
    ImageLike,
    RewardOutput,
    check_batch,
    check_batch_size,
    require_path,
    resolve_device,
    score_batches,
)
from rewards.clip_common import hf_image_embeds, l2_normalize, load_hf_clip, require_folder

CLIP_FORMAT = "a transformers CLIPModel folder (config.json, weights, preprocessor_config.json)"
CLIP_SOURCE = "https://huggingface.co/openai/clip-vit-large-patch14"
PREDICTOR_FORMAT = "sac+logos+ava1-l14-linearMSE.pth, a state dict with keys layers.{0,2,4,6,7}.*"
PREDICTOR_SOURCE = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/blob/main/"
    "sac+logos+ava1-l14-linearMSE.pth"
)


class LaionMLP(nn.Module):
    """The improved-aesthetic-predictor head: input -> 1024 -> 128 -> 64 -> 16 -> 1, all linear.

    ImageReward reuses this exact stack on its BLIP feature. The Dropout modules hold no weights
    but keep the Sequential indices (0, 2, 4, 6, 7) that the released state dicts use.
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Predicted score [B]."""
        return self.layers(x_BD).squeeze(-1)


def load_laion_mlp(path: Path, input_size: int) -> LaionMLP:
    """The predictor from its state dict file (strict key and shape match), in eval mode."""
    mlp = LaionMLP(input_size)
    mlp.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return mlp.eval()


class Aesthetic:
    """Aesthetic reward: the LAION predictor on L2-normalised CLIP ViT-L/14 image embeddings."""

    name = "aesthetic"

    def __init__(
        self,
        clip_path: str | Path | None = None,
        predictor_path: str | Path | None = None,
        device: str = "auto",
        batch_size: int = 16,
    ) -> None:
        check_batch_size(self.name, batch_size)
        clip_folder = require_folder(
            clip_path,
            reward=self.name,
            option="clip_path",
            expected=CLIP_FORMAT,
            source=CLIP_SOURCE,
            files=["config.json", "preprocessor_config.json"],
        )
        predictor_file = require_path(
            predictor_path,
            reward=self.name,
            option="predictor_path",
            expected=PREDICTOR_FORMAT,
            source=PREDICTOR_SOURCE,
        )
        self.device = resolve_device(device)
        self.clip = load_hf_clip(clip_folder, self.device)
        self.image_processor = CLIPImageProcessor.from_pretrained(
            clip_folder, local_files_only=True
        )
        self.mlp = load_laion_mlp(predictor_file, self.clip.config.projection_dim).to(self.device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def _predict(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """Predicted aesthetic score [B]; prompts play no part."""
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        embeds_BD = l2_normalize(hf_image_embeds(self.clip, pixels.to(self.device)))
        return self.mlp(embeds_BD).float().cpu().numpy()

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """Aesthetic score per image."""
        check_batch(self.name, images, prompts, metadata)
        return RewardOutput(
            scores=score_batches(self.name, images, prompts, self.batch_size, self._predict)
        )
