"""Flow-GRPO's GenEval reward (its reward server's `evaluate_reward`, reward_server/gen_eval.py).

Where GenEval asks for at least `count` objects and checks the `count` most confident, the server
grades every object kept (score threshold, per-class cap) and wants exact counts. A list of
credits is built over the include clauses, in order; the score is their mean:
- each clause: 1 - |count - found| / count, found = all kept objects of its class (below 0 once
  found > 2 * count);
- found != count: the clause fails, and a clause with a colour or a position adds one credit 0;
- found == count, colour: 1 - |count - right| / count, right = objects of that colour; the clause
  fails unless all are;
- found == count, position (when the colour held): 0 if the clause it refers to failed; else, for
  a relation that fails between some object and some object of that clause, a credit 0, and then
  in every case a credit 1 (the server appends 1 after its relation loop whatever the outcome, so a
  failed relation counts 0 and 1);
- exclude clauses play no part.
`strict` is the server's `strict_correct`: every clause met exactly (counts, colours, relations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rewards.geneval.detectors import Detection
from rewards.geneval.rules import ColorFn, Spec, relative_position


@dataclass(frozen=True)
class PartialCredit:
    """The credits of one image, in the server's order, and whether every clause held exactly."""

    credits: tuple[float, ...]
    strict: bool
    reasons: tuple[str, ...]

    @property
    def score(self) -> float:
        """Mean credit (the server's `score`)."""
        return sum(self.credits) / len(self.credits)


def count_credit(count: int, found: int) -> float:
    """1 - |count - found| / count."""
    return 1.0 - abs(count - found) / count


def _relation_holds(
    found: Sequence[Detection], targets: Sequence[Detection], relation: str, position: float
) -> bool:
    return all(relation in relative_position(a, b, position) for a in found for b in targets)


def evaluate_partial(
    spec: Spec, objects: Mapping[str, Sequence[Detection]], colors: ColorFn, position: float = 0.1
) -> PartialCredit:
    """Flow-GRPO's partial-credit score of `spec` on the kept objects (see the module docstring)."""
    credits: list[float] = []
    reasons: list[str] = []
    groups: list[Sequence[Detection] | None] = []  # each clause's objects, None if it failed
    for req in spec.include:
        found = list(objects.get(req.cls, []))
        credits.append(count_credit(req.count, len(found)))
        matched = len(found) == req.count
        if not matched:
            reasons.append(f"expected {req.cls}=={req.count}, found {len(found)}")
            if req.color is not None or req.position is not None:
                credits.append(0.0)
        if matched and req.color is not None:
            num_right = colors(req.cls, found).count(req.color)
            credits.append(count_credit(req.count, num_right))
            if num_right != req.count:
                matched = False
                reasons.append(f"expected {req.color} {req.cls}=={req.count}, found {num_right}")
        if matched and req.position is not None:
            relation, target = req.position
            targets = groups[target]
            if targets is None:
                matched = False
                reasons.append(f"no target for {req.cls} to be {relation}")
                credits.append(0.0)
            else:
                if not _relation_holds(found, targets, relation, position):
                    matched = False
                    reasons.append(f"expected {req.cls} {relation} {spec.include[target].cls}")
                    credits.append(0.0)
                credits.append(1.0)
        groups.append(found if matched else None)
    return PartialCredit(tuple(credits), not reasons, tuple(reasons))
