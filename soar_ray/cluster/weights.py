"""Weight sync, learner -> rollout workers, version-stamped; `cluster.weight_sync` picks the backend
(default `auto`: collective when learners and rollout workers hold GPUs, each worker whole ones of
its own, else the object store).

`object_store` works everywhere (CPU, GPU, multi-node): learner rank 0 gathers the trainable
weights (a ZeRO-3 gather when partitioned), puts them in the Ray object store once, and every
rollout worker pulls them.

`collective`: learner rank 0 broadcasts the same weights (`Learner.exported`: a LoRA stage's
adapters only) straight into every rollout worker over a process group of their own, NCCL on GPUs
and gloo on CPU, in flat buckets of at most 256 MiB (workers/weight_transfer.py). The group is
built when the sync starts: the driver picks rank 0's address (127.0.0.1 when every member shares
learner-0's node, else learner-0's node address), learner-0 binds a free port there, and every
member builds the group from a TCPStore served on it, beside the learners' own default group.
Learner rank 0 returns as soon as the broadcasts are under way and keeps the buckets (one more copy
of the trainable weights on its device, until the next push), so a push never holds the learners;
each worker takes the push when it reaches the receive queued after its earlier calls.

Restarts: every restored rollout worker gets the last push from an object-store copy that
learner-0 makes of its kept buckets, only when a restore asks for it. A restored worker is a new
member, so learner-0 then leaves the group (`replaced`): its connections close, and gloo members
still waiting in a push fail at once instead of at the timeout (a worker whose receive failed
starts afresh and is restored in turn, as if restarted); the next push rebuilds the group. A
member lost while the group forms stops the run. On NCCL a member lost mid-push is only noticed
at the group's timeout (`cluster.call_timeout_s`), when NCCL's watchdog ends the processes still
waiting: the run then stops, or restarts from its last checkpoint with `cluster.max_job_restarts`.
Stage handoffs (the full weights) and evaluation keep the object store.
"""

from __future__ import annotations

from typing import Protocol

import ray
from ray.exceptions import RayTaskError

from soar_ray.cluster.actors import Step
from soar_ray.cluster.groups import LearnerGroup, RolloutCall, RolloutPool
from soar_ray.config import ClusterConfig
from soar_ray.errors import RunStopped
from soar_ray.workers.learner import Learner
from soar_ray.workers.rollout import RolloutWorker


class WeightSync(Protocol):
    version: int
    """The version of the last push (-1 before the first push of a stage)."""

    def push(self, version: int, *, ema: bool = False) -> None:
        """Start sending the learners' current (or EMA) weights, stamped `version`."""

    def wait(self) -> None:
        """Block until every rollout worker holds the last pushed version."""

    def forget(self) -> None:
        """A new stage starts: the workers hold its start weights until the next push."""

    def restore_steps(self) -> list[Step]:
        """What gives a restarted worker the last pushed weights (nothing before a push)."""

    def replaced(self, index: int) -> None:
        """Rollout worker `index` was just restored in place of a lost one (a new member)."""


def build_weight_sync(cluster: ClusterConfig, learners: LearnerGroup,
                      rollouts: RolloutPool) -> WeightSync:  # fmt: skip
    """The backend `cluster.weight_sync` resolves to."""
    if cluster.weight_sync_backend == "collective":
        return CollectiveWeightSync(learners, rollouts, cluster)
    return ObjectStoreWeightSync(learners, rollouts)


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
        self.weights, self.version = None, -1

    def restore_steps(self) -> list[Step]:
        if self.weights is None:
            return []
        return [(RolloutWorker.load_weights, (self.weights, self.version))]

    def replaced(self, index: int) -> None:
        pass  # every worker pulls from the object store: there is no membership


class CollectiveWeightSync:
    """Learner rank 0 -> a weight group with every rollout worker -> their parameters."""

    def __init__(self, learners: LearnerGroup, rollouts: RolloutPool,
                 cluster: ClusterConfig) -> None:  # fmt: skip
        self.learners, self.rollouts = learners, rollouts
        # A collective may wait for the rollout calls queued before it: as long as one call.
        self.op_timeout_s = cluster.call_timeout_s
        self.backend = "nccl" if cluster.gpus_per_learner > 0 else "gloo"
        self.version = -1
        self._sends: list[ray.ObjectRef] = []
        self._receives: list[RolloutCall] = []
        self._kept: tuple[ray.ObjectRef, int] | None = None
        self._group_up = False
        self._build(cluster.start_timeout_s)

    def push(self, version: int, *, ema: bool = False) -> None:
        self._finish()  # a worker lost in the last push is restored here, before a rebuild
        if not self._group_up:
            self._build(self.op_timeout_s)
        self._sends = self.learners.submit(Learner.send_weights, ema=ema)
        self.version = version
        self._receives = self.rollouts.broadcast(RolloutWorker.receive_weights, version)

    def wait(self) -> None:
        self._finish()

    def forget(self) -> None:
        assert not self._sends and not self._receives, "a stage's last push is waited for first"
        self.version, self._kept = -1, None

    def restore_steps(self) -> list[Step]:
        """The last push, from learner-0's copy of its buckets."""
        if self.version < 0:
            return []
        if self._kept is None or self._kept[1] != self.version:
            self._kept = (self.learners.first(Learner.pushed_weights), self.version)
        return [(RolloutWorker.load_weights, self._kept)]

    def replaced(self, index: int) -> None:
        """A new member: learner-0 leaves the group at once, so members still waiting in a push
        on it fail (and are restored in turn) rather than at the timeout; the next push
        rebuilds it."""
        if self._group_up:
            print(f"soar-ray: {self.rollouts.names[index]} was replaced: learner-0 leaves the "
                  "collective weight group, the next push rebuilds it", flush=True)  # fmt: skip
            self.learners.call(Learner.leave_weight_group)
            self._group_up = False

    def _finish(self) -> None:
        """Wait for the last push: its sends first (quick: they only start the broadcasts), then
        every receive (a worker lost in it is restored with the last push by the pool)."""
        sends, self._sends = self._sends, []
        self.learners.get(sends)
        receives, self._receives = self._receives, []
        self.rollouts.wait(receives)

    def _build(self, timeout_s: float) -> None:
        """(Re)build the group of learner-0 and every rollout worker; its members meet within
        `timeout_s` (queued rollout calls included)."""
        learner_node, learner_address, _ = self.learners.nodes[0]
        nodes = self.rollouts.nodes(timeout_s)
        local = all(node == learner_node for node, _ in nodes)
        host = "127.0.0.1" if local else learner_address
        binds = [host, *(host if local else address for _, address in nodes)]
        size = 1 + len(nodes)
        port = self.learners.call(Learner.listen_weight_group, host)[0]
        joins = self.learners.submit(Learner.join_weight_group, host, port, size, binds[0],
                                     timeout_s, self.op_timeout_s)  # fmt: skip
        members = self.rollouts.broadcast(RolloutWorker.join_weight_group, host, port, size, binds,
                                          timeout_s, self.op_timeout_s)  # fmt: skip
        try:
            self.rollouts.wait(members)
        except RayTaskError as exc:  # a worker's RunStopped is one line, as a learner's
            if isinstance(exc.cause, RunStopped):
                raise exc.cause from None
            raise
        self.learners.get(joins)
        self._group_up = True
        print(f"soar-ray: weight sync: collective ({self.backend}), learner-0 and {size - 1} "
              f"rollout workers, rendezvous at {host}:{port}", flush=True)  # fmt: skip
