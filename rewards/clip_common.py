"""Loading and embedding code shared by the CLIP-family rewards.

Two tower flavours, each matching how its checkpoints are published:
- open_clip (HPSv2.1, CLIPScore): an architecture name from open_clip's registry plus one weights
  file, loaded with `strict=True` through open_clip's own checkpoint loader.
- transformers (PickScore, Aesthetic): a `CLIPModel` folder (config.json + weights) and a
  `CLIPProcessor` / `CLIPImageProcessor` folder, read with `local_files_only=True`.
Everything runs in float32; the embeddings are L2-normalised where a reward says so.
An open_clip reward may replace open_clip's eval transform (shortest side resized, centre crop) by
the one its original scorer used: `pad_longest_transform` (HPSv2) or `shortest_side_transform`
(Flow-GRPO's CLIPScore).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode
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


Transform = Callable[[Image.Image], torch.Tensor]
"""An RGB PIL image -> normalised pixels [3, side, side]."""
TransformFactory = Callable[[int, Sequence[float], Sequence[float]], Transform]
"""(side, mean, std) -> a Transform; the model's preprocess config supplies the three."""


def pad_longest_transform(side: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
    """HPSv2's eval transform (its open_clip fork's ResizeMaxSize): the image as a [0, 1] tensor,
    its longest side resized to `side` on that float tensor (bicubic, antialiased), padded to a
    square with 0 (black; the smaller half before, the larger after), then normalised."""

    def transform(image: Image.Image) -> torch.Tensor:
        pixels_CHW = TF.to_tensor(image)
        height, width = pixels_CHW.shape[1:]
        scale = side / max(height, width)
        size = [round(height * scale), round(width * scale)]
        # HPSv2 leaves an image whose longest side is already `side` as it is; padding such an
        # image too only matters when it is not square, where HPSv2's model could not run.
        if size != [height, width]:
            pixels_CHW = TF.resize(pixels_CHW, size, InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = side - size[0], side - size[1]
        padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]
        return TF.normalize(TF.pad(pixels_CHW, padding, fill=0.0), list(mean), list(std))

    return transform


def shortest_side_transform(side: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
    """Flow-GRPO's ClipScorer transform: the image as a [0, 1] tensor, its shortest side resized
    to `side` (torchvision's default bilinear, antialiased), centre-cropped square, normalised."""

    def transform(image: Image.Image) -> torch.Tensor:
        pixels_CHW = TF.resize(
            TF.to_tensor(image), side, InterpolationMode.BILINEAR, antialias=True
        )
        return TF.normalize(TF.center_crop(pixels_CHW, [side, side]), list(mean), list(std))

    return transform


def square_side(reward: str, size: int | Sequence[int]) -> int:
    """The side of a square input size, or an error naming the reward."""
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"reward {reward!r}: the model's input size {size} is not square")
    return int(size[0])


class OpenClipTowers:
    """An open_clip model, its tokenizer and eval transform; cosine of each image-prompt pair."""

    def __init__(
        self,
        *,
        reward: str,
        model_name: str,
        checkpoint: Path,
        device: str,
        transform: TransformFactory | None = None,  # None: open_clip's own eval transform
    ) -> None:
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
        if transform is not None:
            config = open_clip.get_model_preprocess_cfg(self.model)
            side = square_side(reward, config["size"])
            self.preprocess = transform(side, config["mean"], config["std"])
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.logit_scale = float(self.model.logit_scale.detach().exp())
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

    Subclasses set `name`, `checkpoint_format`, `checkpoint_source`, optionally `transform` (the
    scorer's own image transform) and turn the cosine into the reward in `from_cosine`.
    """

    name: str
    checkpoint_format: str
    checkpoint_source: str
    transform: TransformFactory | None = None

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
            expected=self.checkpoint_format, source=self.checkpoint_source,
        )  # fmt: skip
        self.towers = OpenClipTowers(
            reward=self.name, model_name=model_name, checkpoint=path,
            device=resolve_device(device), transform=self.transform,
        )  # fmt: skip
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
