"""Loading and embedding code shared by the CLIP-family rewards.

Two tower flavours, each matching how its checkpoints are published:
- open_clip (HPSv2.1, CLIPScore): an architecture name from open_clip's registry plus one weights
  file, loaded with `strict=True` through open_clip's own checkpoint loader.
- transformers (PickScore, Aesthetic): a `CLIPModel` folder (config.json + weights) and a
  `CLIPProcessor` / `CLIPImageProcessor` folder, read with `local_files_only=True`.
Everything runs in float32; the embeddings are L2-normalised where a reward says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from transformers import CLIPModel

from rewards.base import (
    ImageLike,
    MissingCheckpointError,
    RewardOutput,
    check_batch,
    check_batch_size,
    require_path,
    resolve_device,
    score_batches,
)


def require_folder(
    path: str | Path | None,
    *,
    reward: str,
    option: str,
    expected: str,
    source: str,
    files: Sequence[str],
) -> Path:
    """Folder `path` holding every name in `files`, or an error naming the option and the file."""
    folder = require_path(path, reward=reward, option=option, expected=expected, source=source)
    for name in files:
        if not (folder / name).is_file():
            raise MissingCheckpointError(
                f"reward {reward!r}: {option}={str(folder)!r} has no {name}; expected {expected} "
                f"({source})"
            )
    return folder


def l2_normalize(x_BD: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (CLIP's cosine similarity is a dot product of these)."""
    return x_BD / x_BD.norm(dim=-1, keepdim=True)


class OpenClipTowers:
    """An open_clip model, its tokenizer and eval transform; cosine of each image-prompt pair."""

    def __init__(self, *, reward: str, model_name: str, checkpoint: Path, device: str) -> None:
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"reward {reward!r}: model_name {model_name!r} is not an open_clip architecture "
                f"(register a config with open_clip.add_model_config first)"
            )
        # pretrained=<file> loads the state dict with strict=True; a {"state_dict": ...} wrapper
        # (HPSv2's format) is unwrapped by open_clip's loader.
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(checkpoint), device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device

    @torch.inference_mode()
    def cosine(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """cos(image_i, prompt_i) [B] of the normalised image and text embeddings."""
        pixels_BCHW = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        tokens_BL = self.tokenizer(prompts).to(self.device)
        image_BD = self.model.encode_image(pixels_BCHW, normalize=True)
        text_BD = self.model.encode_text(tokens_BL, normalize=True)
        return (image_BD * text_BD).sum(dim=-1).float().cpu().numpy()


def load_hf_clip(folder: Path, device: str) -> CLIPModel:
    """A transformers CLIPModel from a local folder, in eval mode on `device`."""
    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval()


# The two helpers below spell out `CLIPModel.get_image_features` / `get_text_features`, whose
# return type changed in transformers 5 (a ModelOutput instead of a tensor).
def hf_image_embeds(model: CLIPModel, pixel_values_BCHW: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings [B, P] (what `CLIPModel.get_image_features` computes)."""
    pooled_BH = model.vision_model(pixel_values=pixel_values_BCHW).pooler_output
    return model.visual_projection(pooled_BH)


def hf_text_embeds(
    model: CLIPModel, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor
) -> torch.Tensor:
    """Projected text embeddings [B, P] (what `CLIPModel.get_text_features` computes)."""
    pooled_BH = model.text_model(
        input_ids=input_ids_BL, attention_mask=attention_mask_BL
    ).pooler_output
    return model.text_projection(pooled_BH)


class OpenClipCosineReward:
    """A reward computed from the open_clip image-prompt cosine of one checkpoint file.

    Subclasses set `name`, `CHECKPOINT_FORMAT`, `CHECKPOINT_SOURCE` and turn the cosine into the
    reward in `from_cosine`.
    """

    name: str
    CHECKPOINT_FORMAT: str
    CHECKPOINT_SOURCE: str

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_name: str = "ViT-H-14",
        device: str = "auto",
        batch_size: int = 16,
    ) -> None:
        check_batch_size(self.name, batch_size)
        path = require_path(
            checkpoint, reward=self.name, option="checkpoint",
            expected=self.CHECKPOINT_FORMAT, source=self.CHECKPOINT_SOURCE,
        )  # fmt: skip
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
        check_batch(self.name, images, prompts, metadata)
        cosine = score_batches(self.name, images, prompts, self.batch_size, self.towers.cosine)
        return self.from_cosine(cosine)

    def from_cosine(self, cosine: np.ndarray) -> RewardOutput:
        raise NotImplementedError
