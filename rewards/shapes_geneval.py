"""GenEval on the shapes world (soar_ray/data/shapes.py): exact classical vision, no model.

An image's objects are its colour blobs, found as follows.
- Foreground: pixels farther (RGB distance) from the world's BACKGROUND than half the distance
  of the palette colour nearest to it; blobs are its 8-connected components of at least MIN_AREA
  of the image (smaller ones are speckle, a third of the world's smallest shape).
- Colour: the palette colour nearest to the mean of the blob's inner half (its pixels farthest
  from the background), so soft edges, mixed with the background, do not vote.
- Shape: the blob's coverage (each pixel projected on background -> its colour, in [0, 1]) gives
  its area and centroid, which a blur leaves unchanged. Every shape of the world is drawn by the
  world's own `coverage` with that area and centroid, blurred by each of BLURS (generated images
  are soft), and compared to the blob (L1 over the area); the closest wins. A blob farther than
  MAX_SHAPE_ERROR from every shape (a smear, a ring) is no object.
Blobs become GenEval detections (pixel box, score 1, best-matching first) judged by GenEval's
rules (rewards/geneval/rules.py): score = fraction of requirements met, strict = all met.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from rewards.base import ImageLike, RewardOutput, check_batch, check_batch_size, to_uint8
from rewards.geneval import GenEvalResult, verdict_components
from rewards.geneval.detectors import Detection
from rewards.geneval.rules import Thresholds, evaluate, parse_spec, select_objects
from soar_ray.data.shapes import BACKGROUND, BAR_HEIGHT, PALETTE, SHAPES, coverage

MIN_AREA = 0.01
"""Smallest blob, as a fraction of the image."""
MAX_SHAPE_ERROR = 0.4
"""Largest L1 difference, over the blob's area, between a blob and the shape it is taken for."""
BLURS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
"""Gaussian sigmas (pixels) a shape template is tried at."""
BOX_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9, "bar": 1.0}
"""Fraction of its box each shape covers (cross: arms a third of its side)."""
CENTROID_Y = {"circle": 0.5, "square": 0.5, "triangle": 2 / 3, "cross": 0.5, "bar": 0.5}
"""Height of each shape's centroid in its box, from the top (triangle: apex up)."""

_COLORS = np.array(list(PALETTE.values()), dtype=np.float32)
_COLOR_NAMES = list(PALETTE)
_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_FOREGROUND = 0.5 * float(np.linalg.norm(_COLORS - _BACKGROUND, axis=1).min())


@dataclass(frozen=True, kw_only=True)
class Blob(Detection):
    """A detected shape: GenEval detection plus its palette colour and template error."""

    color: str
    error: float


def _template(
    shape: str, area: float, centroid: tuple[float, float], hw: tuple[int, int]
) -> np.ndarray:
    """Coverage of `shape` with the given area (pixels) and centroid (x, y)."""
    height_ratio = BAR_HEIGHT if shape == "bar" else 1.0
    width = np.sqrt(area / (BOX_FILL[shape] * height_ratio))
    height = width * height_ratio
    x0, y0 = centroid[0] - width / 2, centroid[1] - CENTROID_Y[shape] * height
    return coverage(shape, (x0, y0, x0 + width, y0 + height), *hw)


def classify_shape(alpha: np.ndarray) -> tuple[str, float]:
    """The world shape closest to a blob's coverage [H, W], and its L1 error over the area."""
    area = float(alpha.sum())
    ys, xs = np.mgrid[: alpha.shape[0], : alpha.shape[1]]
    centroid = (float((alpha * (xs + 0.5)).sum()) / area, float((alpha * (ys + 0.5)).sum()) / area)
    errors = {}
    for shape in SHAPES:
        template = _template(shape, area, centroid, alpha.shape)
        blurred = (cv2.GaussianBlur(template, (0, 0), s) if s else template for s in BLURS)
        errors[shape] = min(float(np.abs(alpha - b).sum()) for b in blurred) / area
    best = min(errors, key=errors.__getitem__)
    return best, errors[best]


def find_blobs(image: ImageLike) -> list[Blob]:
    """The shapes of an image, best-matching first (see the module docstring)."""
    pixels = to_uint8(image).astype(np.float32)
    height, width = pixels.shape[:2]
    distance = np.linalg.norm(pixels - _BACKGROUND, axis=2)
    foreground = (distance > _FOREGROUND).astype(np.uint8)
    num_labels, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    blobs = []
    for label in range(1, num_labels):
        x, y, w, h, num_pixels = (int(v) for v in stats[label])
        if num_pixels < MIN_AREA * height * width:
            continue
        inside = labels == label
        inner = distance[inside] >= np.median(distance[inside])
        mean = pixels[inside][inner].mean(axis=0)
        index = int(np.linalg.norm(_COLORS - mean, axis=1).argmin())
        direction = _COLORS[index] - _BACKGROUND
        alpha = np.clip((pixels - _BACKGROUND) @ direction / float(direction @ direction), 0, 1)
        # The soft edge lies just outside the thresholded blob: widen by 2 px, not into others.
        near = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        near &= (labels == 0) | inside
        # Judged in a window around the blob wide enough for every template, whatever the image.
        pad = max(w, h) // 2 + 4
        window = (slice(max(y - pad, 0), y + h + pad), slice(max(x - pad, 0), x + w + pad))
        shape, error = classify_shape(np.where(near, alpha, 0)[window].astype(np.float32))
        if error <= MAX_SHAPE_ERROR:
            box = (float(x), float(y), float(x + w), float(y + h))
            blobs.append(Blob(shape, 1.0, box, color=_COLOR_NAMES[index], error=error))
    return sorted(blobs, key=lambda blob: blob.error)


def _blob_colors(cls: str, objects: Sequence[Blob]) -> list[str]:
    """GenEval's colour callback: each blob knows its colour."""
    return [obj.color for obj in objects]


class ShapesGenEval:
    """GenEval rules over the exact blob detector of the shapes world."""

    name = "shapes_geneval"

    def __init__(
        self,
        device: str = "auto",  # common option; blob finding runs on CPU whatever it says
        batch_size: int = 16,  # common option; images are scored one at a time
        position_threshold: float = 0.1,  # GenEval's relative-position tolerance
    ) -> None:
        check_batch_size(self.name, batch_size)
        self.thresholds = Thresholds(position=position_threshold)

    def evaluate(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[GenEvalResult]:
        """The GenEval verdict of every image (metadata: its prompt's GenEval row)."""
        rows = check_batch(self.name, images, prompts, metadata)
        specs = [parse_spec(row, prompt, classes=SHAPES, colors=tuple(PALETTE), reward=self.name)
                 for row, prompt in zip(rows, prompts)]  # fmt: skip
        results = []
        for image, prompt, spec in zip(images, prompts, specs):
            objects = select_objects(find_blobs(image), spec.tag, self.thresholds)
            verdict = evaluate(spec, objects, _blob_colors, self.thresholds.position)
            results.append(GenEvalResult(prompt, spec.tag, verdict, objects))
        return results

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """Fraction of GenEval requirements satisfied per image, plus strict accuracy."""
        components = verdict_components(self.evaluate(images, prompts, metadata))
        return RewardOutput(components["geneval_accuracy"], components)
