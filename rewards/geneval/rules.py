"""The GenEval rules (Ghosh et al. 2023, evaluation/evaluate_images.py) over detections.

A prompt's metadata row (tag, include, exclude; see /work/shared/data/prompts/
geneval_test_metadata.jsonl) becomes a list of binary requirements:
- every include clause: at least `count` objects of its class (the `count` most confident count);
- its `color`, if any: at least `count` of those objects have that colour;
- its `position`, if any: each of those objects stands in the relation to every object of the
  include clause it names, and that clause was itself fully satisfied;
- every exclude clause: fewer than `count` objects of its class (with an include of count N,
  an exclude of N + 1 makes counting exact).
GenEval's `correct` is "all requirements satisfied" (our strict accuracy); the reward is the
fraction satisfied (SPEC §5). Boxes are pixel (x0, y0, x1, y1), y pointing down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewards.geneval.detectors import CLASSES, Detection

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

ColorFn = Callable[[str, Sequence[Detection]], list[str]]
"""(class name, objects) -> the colour name of each object."""


@dataclass(frozen=True)
class Thresholds:
    """Detection filtering and position tolerance, GenEval's defaults."""

    score: float = 0.3
    """Keep detections scoring above this (every tag but counting)."""
    counting_score: float = 0.9
    """Keep detections scoring above this for `counting` prompts."""
    max_objects: int = 16
    """Most objects kept per class."""
    nms_iou: float = 1.0
    """Drop a detection overlapping a kept one of its class by this IoU or more; 1 keeps all."""
    position: float = 0.1
    """Centre offsets shrink by this fraction of the two objects' summed size before a relation."""

    def __post_init__(self) -> None:
        for name in ("score", "counting_score", "nms_iou", "position"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"geneval threshold {name} must be in [0, 1]")
        if self.max_objects < 1:
            raise ValueError("geneval threshold max_objects must be >= 1")


@dataclass(frozen=True)
class Include:
    """One include clause: `count` objects of `cls`, optionally of a colour or placed."""

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None  # (relation, index of an earlier include)


@dataclass(frozen=True)
class Spec:
    """A prompt's GenEval requirements."""

    tag: str
    include: tuple[Include, ...]
    exclude: tuple[tuple[str, int], ...] = ()  # (class, count): fewer than count allowed


@dataclass(frozen=True)
class RuleResult:
    """Which requirements held, and why the others did not."""

    num_satisfied: int
    num_requirements: int
    reasons: tuple[str, ...]

    @property
    def accuracy(self) -> float:
        """Fraction of requirements satisfied."""
        return self.num_satisfied / self.num_requirements

    @property
    def strict(self) -> bool:
        """All requirements satisfied (GenEval's `correct`)."""
        return self.num_satisfied == self.num_requirements


def _count(item: Mapping[str, Any], where: str) -> int:
    count = item.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}: 'count' must be an integer >= 1, got {count!r}")
    return count


def _cls(item: Mapping[str, Any], where: str, classes: Sequence[str]) -> str:
    if item.get("class") not in classes:
        what = "a GenEval class" if classes is CLASSES else f"one of {tuple(classes)}"
        raise ValueError(f"{where}: 'class' {item.get('class')!r} is not {what}")
    return item["class"]


def parse_spec(
    metadata: Mapping[str, Any] | None,
    prompt: str,
    *,
    classes: Sequence[str] = CLASSES,
    colors: Sequence[str] = COLORS,
    reward: str = "geneval",
) -> Spec:
    """A GenEval metadata row as a Spec; errors name the reward, the prompt and the field.
    `classes` and `colors`: the vocabulary of the world judged (GenEval's COCO by default)."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"{reward}: prompt {prompt!r} has no GenEval metadata row")
    tag = metadata.get("tag")
    if tag not in TAGS:
        raise ValueError(f"{reward}: prompt {prompt!r}: 'tag' {tag!r} is not one of {TAGS}")
    rows = metadata.get("include")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{reward}: prompt {prompt!r}: 'include' must be a non-empty list")
    include = []
    for i, row in enumerate(rows):
        where = f"{reward}: prompt {prompt!r}: include[{i}]"
        color, position = row.get("color"), row.get("position")
        if color is not None and color not in colors:
            raise ValueError(f"{where}: 'color' {color!r} is not one of {tuple(colors)}")
        if position is not None:
            if not (
                isinstance(position, (list, tuple))
                and len(position) == 2
                and position[0] in RELATIONS
                and isinstance(position[1], int)
                and 0 <= position[1] < i
            ):
                raise ValueError(
                    f"{where}: 'position' must be [relation in {RELATIONS}, index of an earlier "
                    f"include], got {position!r}"
                )
            position = (position[0], position[1])
        include.append(Include(_cls(row, where, classes), _count(row, where), color, position))
    exclude = []
    for i, row in enumerate(metadata.get("exclude", [])):
        where = f"{reward}: prompt {prompt!r}: exclude[{i}]"
        exclude.append((_cls(row, where, classes), _count(row, where)))
    return Spec(tag, tuple(include), tuple(exclude))


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel convention (width = x1 - x0 + 1)."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    corners = (max(box_a[0], box_b[0]), max(box_a[1], box_b[1]))
    inter = area((*corners, min(box_a[2], box_b[2]), min(box_a[3], box_b[3])))
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def select_objects(
    detections: Sequence[Detection], tag: str, thresholds: Thresholds
) -> dict[str, list[Detection]]:
    """Class -> its kept detections, most confident first (GenEval's threshold, cap and NMS)."""
    min_score = thresholds.counting_score if tag == "counting" else thresholds.score
    candidates: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        if det.score > min_score:
            candidates.setdefault(det.label, []).append(det)
    objects = {}
    for cls, dets in candidates.items():
        kept: list[Detection] = []
        for det in dets[: thresholds.max_objects]:  # the cap comes before NMS, as in GenEval
            if thresholds.nms_iou == 1.0 or all(
                box_iou(det.box, other.box) < thresholds.nms_iou for other in kept
            ):
                kept.append(det)
        objects[cls] = kept
    return objects


def relative_position(a: Detection, b: Detection, threshold: float) -> set[str]:
    """Relations of A to B: the centre offset less threshold * (size A + size B), its direction."""
    box_a, box_b = np.asarray(a.box, dtype=np.float64), np.asarray(b.box, dtype=np.float64)
    offset = (box_a[:2] + box_a[2:]) / 2 - (box_b[:2] + box_b[2:]) / 2
    sizes = (box_a[2:] - box_a[:2]) + (box_b[2:] - box_b[:2])
    revised = np.maximum(np.abs(offset) - threshold * sizes, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(
    spec: Spec, objects: Mapping[str, Sequence[Detection]], colors: ColorFn, position: float = 0.1
) -> RuleResult:
    """Check every requirement of `spec` on the kept objects (see the module docstring)."""
    checks: list[bool] = []
    reasons: list[str] = []

    def check(ok: bool, reason: str) -> bool:
        checks.append(ok)
        if not ok:
            reasons.append(reason)
        return ok

    groups: list[Sequence[Detection] | None] = []  # each include's objects, None if it failed
    for req in spec.include:
        found = list(objects.get(req.cls, []))[: req.count]
        matched = check(
            len(found) >= req.count, f"expected {req.cls}>={req.count}, found {len(found)}"
        )
        if req.color is not None:
            found_colors = colors(req.cls, found) if matched else []
            num_right = found_colors.count(req.color)
            matched = check(
                matched and num_right >= req.count,
                f"expected {req.color} {req.cls}>={req.count}, found {num_right} "
                f"({', '.join(found_colors) or 'colour not checked'})",
            )
        if req.position is not None:
            relation, target = req.position
            targets = groups[target]
            ok = (
                matched
                and targets is not None
                and all(
                    relation in relative_position(obj, other, position)
                    for obj in found
                    for other in targets
                )
            )
            matched = check(ok, f"expected {req.cls} {relation} {spec.include[target].cls}")
        groups.append(found if matched else None)
    for cls, count in spec.exclude:
        num_found = len(objects.get(cls, []))
        check(num_found < count, f"expected {cls}<{count}, found {num_found}")
    return RuleResult(sum(checks), len(checks), tuple(reasons))
