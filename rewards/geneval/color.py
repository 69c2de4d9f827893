"""Colour of detected objects, one of rules.COLORS, two ways.

- ClipColorClassifier: GenEval's way. Zero-shot CLIP (open_clip ViT-L-14, OpenAI weights) on the
  object's crop, its mask pasted on a #999 grey background; the prompts of each colour are
  "a photo of a {c} {class}", "a photo of a {c}-colored {class}", "a photo of a {c} object",
  their normalised text embeddings averaged per colour.
- PixelColorClassifier: no checkpoint needed. Every pixel of the object (its mask, or the central
  half of its box, where the object rather than the background is) gets a colour name from fixed
  HSV rules; the object takes the most frequent one. Grey counts as white or black by brightness.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from rewards.base import require_path
from rewards.geneval.detectors import Detection
from rewards.geneval.rules import COLORS

if TYPE_CHECKING:
    import torch

CLIP_TEMPLATES = (
    "a photo of a {c} {cls}",
    "a photo of a {c}-colored {cls}",
    "a photo of a {c} object",
)
CLIP_SOURCE = (
    "open_clip_pytorch_model.bin (or open_clip_model.safetensors) of the Hugging Face repo "
    "timm/vit_large_patch14_clip_224.openai, the OpenAI CLIP ViT-L/14 GenEval uses"
)
_MAX_PIXELS = 16384  # pixels voted per object; a stride keeps big objects cheap


def _box_pixels(box: Sequence[float], hw: tuple[int, int], central: bool) -> tuple[slice, slice]:
    """Row and column slices of a pixel box (its central half if `central`), at least 1 pixel."""
    x0, y0, x1, y1 = box
    if central:
        x0, x1 = x0 + (x1 - x0) / 4, x1 - (x1 - x0) / 4
        y0, y1 = y0 + (y1 - y0) / 4, y1 - (y1 - y0) / 4
    height, width = hw
    c0, r0 = min(max(int(x0), 0), width - 1), min(max(int(y0), 0), height - 1)
    c1, r1 = max(min(int(np.ceil(x1)), width), c0 + 1), max(min(int(np.ceil(y1)), height), r0 + 1)
    return slice(r0, r1), slice(c0, c1)


def pixel_colors(rgb_N3: np.ndarray) -> np.ndarray:
    """Index into COLORS of each uint8 RGB pixel, by hue (degrees), saturation and value."""
    rgb = rgb_N3.reshape(-1, 3).astype(np.float64) / 255.0
    v, low = rgb.max(1), rgb.min(1)
    chroma = v - low
    s = np.where(v > 0, chroma / np.maximum(v, 1e-12), 0.0)
    r, g, b = rgb.T
    safe = np.maximum(chroma, 1e-12)
    sector = np.select(  # the hexagonal hue sector, 0-6
        [chroma == 0, v == r, v == g],
        [0.0, ((g - b) / safe) % 6, (b - r) / safe + 2],
        (r - g) / safe + 4,
    )
    h = 60.0 * sector
    reddish = (h < 15) | (h >= 345)
    rules = [  # first match wins
        (v < 0.2, "black"),
        ((s < 0.2) & (v >= 0.55), "white"),
        (s < 0.2, "black"),
        (reddish & (s < 0.5) & (v > 0.8), "pink"),  # pale red reads as pink
        (reddish, "red"),
        ((h < 45) & (v < 0.65), "brown"),  # dark orange is brown
        (h < 45, "orange"),
        (h < 70, "yellow"),
        (h < 165, "green"),
        (h < 255, "blue"),
        (h < 315, "purple"),
    ]
    return np.select(
        [c for c, _ in rules], [COLORS.index(n) for _, n in rules], COLORS.index("pink")
    )


class PixelColorClassifier:
    """Majority HSV colour name of an object's pixels (mask, else the box's central half)."""

    def __call__(
        self, image: np.ndarray, classname: str, objects: Sequence[Detection]
    ) -> list[str]:
        """The colour of each object in the uint8 RGB image; the class name is not used."""
        names = []
        for obj in objects:
            rows, cols = _box_pixels(obj.box, image.shape[:2], central=obj.mask is None)
            pixels = image[rows, cols]
            if obj.mask is not None and obj.mask[rows, cols].any():  # an empty mask: its box
                pixels = pixels[obj.mask[rows, cols]]
            pixels = pixels.reshape(-1, 3)
            pixels = pixels[:: max(1, len(pixels) // _MAX_PIXELS)]
            votes = np.bincount(pixel_colors(pixels), minlength=len(COLORS))
            names.append(COLORS[int(votes.argmax())])
        return names


class ClipColorClassifier:
    """GenEval's zero-shot CLIP colour classifier on object crops."""

    def __init__(
        self,
        checkpoint: str | Path | None,
        model_name: str = "ViT-L-14",
        quick_gelu: bool = True,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        path = require_path(
            checkpoint,
            reward="geneval",
            option="clip_checkpoint",
            expected=f"an open_clip {model_name} state dict (.bin/.pt/.safetensors)",
            source=CLIP_SOURCE,
        )
        import open_clip
        import torch

        # OpenAI's CLIP weights were trained with QuickGELU; open_clip's ViT-L-14 config has GELU.
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path), force_quick_gelu=quick_gelu, device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device, self.batch_size = device, batch_size
        self._torch = torch
        self._text_weights: dict[str, torch.Tensor] = {}  # class name -> [D, colours]

    def _weights(self, classname: str) -> torch.Tensor:
        """Per-colour mean of the normalised template embeddings, normalised: [D, colours]."""
        if classname not in self._text_weights:
            torch = self._torch
            columns = []
            for color in COLORS:
                texts = [t.format(c=color, cls=classname) for t in CLIP_TEMPLATES]
                emb = self.model.encode_text(self.tokenizer(texts).to(self.device))
                mean = torch.nn.functional.normalize(emb, dim=-1).mean(0)
                columns.append(torch.nn.functional.normalize(mean, dim=0))
            self._text_weights[classname] = torch.stack(columns, dim=1)
        return self._text_weights[classname]

    def _crop(self, image: Image.Image, obj: Detection) -> Image.Image:
        """The object's box crop, pixels outside its mask set to GenEval's #999 grey."""
        if obj.mask is not None:
            grey = Image.new("RGB", image.size, (153, 153, 153))
            image = Image.composite(image, grey, Image.fromarray(obj.mask.astype(np.uint8) * 255))
        rows, cols = _box_pixels(obj.box, (image.height, image.width), central=False)
        return image.crop((cols.start, rows.start, cols.stop, rows.stop))

    def __call__(
        self, image: np.ndarray, classname: str, objects: Sequence[Detection]
    ) -> list[str]:
        """The colour of each object: argmax of crop embedding . colour weights."""
        torch = self._torch
        pil = Image.fromarray(image)
        names = []
        with torch.inference_mode():
            weights_DC = self._weights(classname)
            for start in range(0, len(objects), self.batch_size):
                crops = [self._crop(pil, obj) for obj in objects[start : start + self.batch_size]]
                pixels = torch.stack([self.preprocess(c) for c in crops]).to(self.device)
                feats = torch.nn.functional.normalize(self.model.encode_image(pixels), dim=-1)
                names += [COLORS[i] for i in (feats @ weights_DC).argmax(1).tolist()]
        return names
