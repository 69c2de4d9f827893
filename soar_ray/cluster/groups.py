"""Actor groups with rank wiring: the learner group and the rollout pool, placed in the job's
placement group and named by role (`learner-0`, `rollout-1`, ...) for the dashboard.

Both offer the same few generic calls over a worker method (`Learner.train`,
`RolloutWorker.load_weights`, ...): `submit` returns object refs at once, so the driver can keep
sampling while the learners train; `call` waits for the results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import cycle
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from soar_ray.cluster.actors import LearnerActor, RolloutActor
from soar_ray.cluster.placement import Topology, learner_resources, rollout_resources
from soar_ray.config import JobConfig

Method = Callable[..., Any]


def placement(topology: Topology, bundle: int, resources: dict[str, float], name: str) -> dict:
    """Actor options that pin it to `bundle` of the job's placement group under `name`."""
    return {
        "name": name,
        "num_cpus": resources.get("CPU", 0.0),
        "num_gpus": resources.get("GPU", 0.0),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=topology.group, placement_group_bundle_index=bundle
        ),
    }


class LearnerGroup:
    """N learner actors forming one torch.distributed group; calls go to every rank."""

    def __init__(self, job: JobConfig, topology: Topology) -> None:
        cluster = job.cluster
        self.world_size = cluster.num_learners
        resources = learner_resources(cluster)
        self.actors = [
            LearnerActor.options(**placement(topology, bundle, resources, f"learner-{rank}"))
            .remote(job, rank, self.world_size)
            for rank, bundle in enumerate(topology.learner_bundles)
        ]  # fmt: skip
        self.timeout_s = cluster.call_timeout_s
        try:
            # Rank 0's node hosts the rendezvous; every rank joins with the same address and port.
            master_addr, master_port = ray.get(self.actors[0].master_address.remote(),
                                               timeout=cluster.start_timeout_s)  # fmt: skip
            ray.get([a.init_process_group.remote(master_addr, master_port) for a in self.actors],
                    timeout=cluster.start_timeout_s)  # fmt: skip
        except BaseException:
            self.kill()  # a half-formed group holds its bundles for nothing
            raise

    def submit(self, method: Method, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """`method(learner, *args)` on every rank; refs at once (collectives need every rank)."""
        return [actor.call.remote(method, *args, **kwargs) for actor in self.actors]

    def scatter(self, method: Method, per_rank: Sequence[tuple]) -> list[ray.ObjectRef]:
        """`method(learner, *per_rank[r])` on rank r; refs at once. Object refs among the
        arguments arrive resolved, so each rank fetches only its own shard."""
        if len(per_rank) != self.world_size:
            raise ValueError(f"{len(per_rank)} shards for {self.world_size} learners")
        return [actor.call.remote(method, *args) for actor, args in zip(self.actors, per_rank)]

    def call(self, method: Method, *args: Any, **kwargs: Any) -> list[Any]:
        """Every rank's result of `method(learner, *args)`, waited for."""
        return self.get(self.submit(method, *args, **kwargs))

    def first(self, method: Method, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Rank 0's result as a ref, once every rank is done (ZeRO-3 gathers are collective)."""
        refs = self.submit(method, *args, **kwargs)
        self.get(refs[1:])
        return refs[0]

    def get(self, refs: Sequence[ray.ObjectRef]) -> list[Any]:
        return ray.get(list(refs), timeout=self.timeout_s)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class RolloutPool:
    """M rollout actors holding inference copies; `submit` spreads work round-robin. Actors are
    named `<prefix>-<i>` (dashboard); two pools alive at once need different prefixes."""

    def __init__(self, job: JobConfig, topology: Topology, prefix: str = "rollout") -> None:
        cluster = job.cluster
        resources = rollout_resources(cluster)
        self.actors = [
            RolloutActor.options(
                **placement(topology, bundle, resources, f"{prefix}-{index}"),
                max_restarts=cluster.max_actor_restarts,
            ).remote(job, index)  # fmt: skip
            for index, bundle in enumerate(topology.rollout_bundles)
        ]
        self.timeout_s = cluster.call_timeout_s
        self._turn = cycle(range(len(self.actors)))

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, method: Method, *args: Any, num_returns: int = 1, **kwargs: Any) -> Any:
        """`method(worker, *args, **kwargs)` on the next worker in turn: its ref (a list of refs
        when `num_returns` > 1, one per returned item)."""
        actor = self.actors[next(self._turn)]
        return actor.call.options(num_returns=num_returns).remote(method, *args, **kwargs)

    def broadcast(self, method: Method, *args: Any) -> list[ray.ObjectRef]:
        """`method(worker, *args)` on every worker; calls on one actor run in submission order,
        so work submitted after a broadcast sees its effect."""
        return [actor.call.remote(method, *args) for actor in self.actors]

    def call(self, method: Method, *args: Any) -> list[Any]:
        """Every worker's result of `method(worker, *args)`, waited for."""
        return ray.get(self.broadcast(method, *args), timeout=self.timeout_s)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
