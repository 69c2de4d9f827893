"""Weight sync, learner -> rollout workers, version-stamped.

The object-store backend works everywhere (CPU, GPU, multi-node): learner rank 0 gathers the
trainable weights (a ZeRO-3 gather when partitioned), puts them in the Ray object store once, and
every rollout worker pulls them. A GPU backend (NCCL broadcast from rank 0 into a group of the
rollout workers) fits the same `WeightSync` interface.
"""

from __future__ import annotations

from typing import Protocol

import ray

from soar_ray.cluster.actors import Step
from soar_ray.cluster.groups import LearnerGroup, RolloutCall, RolloutPool
from soar_ray.workers.learner import Learner
from soar_ray.workers.rollout import RolloutWorker


class WeightSync(Protocol):
    def push(self, version: int, *, ema: bool = False) -> None:
        """Start sending the learners' current (or EMA) weights, stamped `version`."""

    def wait(self) -> None:
        """Block until every rollout worker holds the last pushed version."""


class ObjectStoreWeightSync:
    """Learner rank 0 -> Ray object store -> every rollout worker. The last pushed weights stay
    in the object store (one copy of the trainable weights) so a restarted worker gets them too."""

    def __init__(self, learners: LearnerGroup, rollouts: RolloutPool) -> None:
        self.learners, self.rollouts = learners, rollouts
        self._pending: list[RolloutCall] = []
        self.weights: ray.ObjectRef | None = None
        self.version = -1

    def push(self, version: int, *, ema: bool = False) -> None:
        # An ObjectRef: the driver never copies the weights.
        self.weights = self.learners.first(Learner.export_weights, ema=ema)
        self.version = version
        self._pending = self.rollouts.broadcast(RolloutWorker.load_weights, self.weights, version)

    def wait(self) -> None:
        self.rollouts.wait(self._pending)
        self._pending = []

    def forget(self) -> None:
        """A new stage starts: the workers hold its start weights until the next push."""
        self.weights, self.version = None, -1

    def restore_steps(self) -> list[Step]:
        """What gives a restarted worker the last pushed weights (nothing before a push)."""
        if self.weights is None:
            return []
        return [(RolloutWorker.load_weights, (self.weights, self.version))]
