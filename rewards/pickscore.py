"""PickScore (Kirstain et al. 2023): a CLIP-H model fine-tuned on Pick-a-Pic preferences.

PickScore(image, prompt) = exp(logit_scale) * cos(E_image, E_prompt), the diagonal of the logits
in PickScore's reference inference code (exp(logit_scale) is about 100 for the released model, so
scores sit around 20-23). `scale` multiplies the score: Flow-GRPO trains on PickScore / 26
(scale=1/26). The raw cosine is kept as component "clip_cosine".
Files: the PickScore_v1 folder (transformers CLIPModel) and the processor of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's reference code loads it from there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPProcessor

from rewards.base import (
    ImageLike,
    RewardOutput,
    check_batch,
    check_batch_size,
    resolve_device,
    score_batches,
)
from rewards.clip_common import (
    hf_image_embeds,
    hf_text_embeds,
    l2_normalize,
    load_hf_clip,
    require_folder,
)

MODEL_FORMAT = "a transformers CLIPModel folder (config.json + weights), PickScore_v1 layout"
MODEL_SOURCE = "https://huggingface.co/yuvalkirstain/PickScore_v1"
PROCESSOR_FORMAT = "a CLIPProcessor folder (preprocessor_config.json + tokenizer files)"
PROCESSOR_SOURCE = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_PROMPT_TOKENS = 77  # CLIP's context length; longer prompts are truncated as in the reference


class PickScore:
    """PickScore reward: scale * exp(logit_scale) * cos(image, prompt)."""

    name = "pickscore"

    def __init__(
        self,
        model_path: str | Path | None = None,
        processor_path: str | Path | None = None,
        scale: float = 1.0,
        device: str = "auto",
        batch_size: int = 16,
    ) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"reward {self.name!r}: scale must be finite, got {scale}")
        check_batch_size(self.name, batch_size)
        model_folder = require_folder(
            model_path,
            reward=self.name,
            option="model_path",
            expected=MODEL_FORMAT,
            source=MODEL_SOURCE,
            files=["config.json"],
        )
        processor_folder = require_folder(
            model_folder if processor_path is None else processor_path,
            reward=self.name,
            option="processor_path",
            expected=PROCESSOR_FORMAT,
            source=PROCESSOR_SOURCE,
            files=["preprocessor_config.json"],
        )
        self.device = resolve_device(device)
        self.model = load_hf_clip(model_folder, self.device)
        self.processor = CLIPProcessor.from_pretrained(processor_folder, local_files_only=True)
        self.scale = scale
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        self.batch_size = batch_size

    @torch.inference_mode()
    def _cosine(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """cos(image_i, prompt_i) [B] of PickScore's normalised embeddings."""
        pixels = self.processor.image_processor(images=images, return_tensors="pt")
        text = self.processor.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=MAX_PROMPT_TOKENS,
            return_tensors="pt",
        )
        image_BD = l2_normalize(hf_image_embeds(self.model, pixels["pixel_values"].to(self.device)))
        text_BD = l2_normalize(
            hf_text_embeds(
                self.model,
                text["input_ids"].to(self.device),
                text["attention_mask"].to(self.device),
            )
        )
        return (image_BD * text_BD).sum(dim=-1).float().cpu().numpy()

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """PickScore per image (times `scale`), with the raw cosine as component "clip_cosine"."""
        check_batch(self.name, images, prompts, metadata)
        cosine = score_batches(self.name, images, prompts, self.batch_size, self._cosine)
        return RewardOutput(
            scores=self.scale * self.logit_scale * cosine, components={"clip_cosine": cosine}
        )
