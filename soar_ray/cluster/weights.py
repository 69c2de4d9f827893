"""Weight sync, learner -> rollout workers, version-stamped.

The object-store backend works everywhere (CPU, GPU, multi-node): learner rank 0 gathers the
trainable weights (a ZeRO-3 gather when partitioned), puts them in the Ray object store once, and
every rollout worker pulls them. A GPU backend (NCCL broadcast from rank 0 into a group of the
rollout workers) fits the same `WeightSync` interface.
"""

from __future__ import annotations

from typing import Protocol

import ray

from soar_ray.cluster.groups import LearnerGroup, RolloutPool
from soar_ray.workers.learner import Learner
from soar_ray.workers.rollout import RolloutWorker


class WeightSync(Protocol):
    def push(self, version: int, *, ema: bool = False) -> None:
        """Start sending the learners' current (or EMA) weights, stamped `version`."""

    def wait(self) -> None:
        """Block until every rollout worker holds the last pushed version."""


class ObjectStoreWeightSync:
    """Learner rank 0 -> Ray object store -> every rollout worker."""

    def __init__(self, learners: LearnerGroup, rollouts: RolloutPool) -> None:
        self.learners, self.rollouts = learners, rollouts
        self._pending: list[ray.ObjectRef] = []
        self.version = -1

    def push(self, version: int, *, ema: bool = False) -> None:
        # An ObjectRef: the driver never copies the weights.
        weights = self.learners.first(Learner.export_weights, ema=ema)
        self._pending = self.rollouts.broadcast(RolloutWorker.load_weights, weights, version)
        self.version = version

    def wait(self) -> None:
        ray.get(self._pending, timeout=self.rollouts.timeout_s)
        self._pending = []
