"""Actor groups with rank wiring: the learner group and the rollout pool, placed in the job's
placement group and named by role (`learner-0`, `rollout-1`, ...) for the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from soar_ray.algo.soar import SoarInputs
from soar_ray.cluster.actors import LearnerActor, RolloutActor
from soar_ray.cluster.placement import Topology, learner_resources, rollout_resources
from soar_ray.config import JobConfig


def _placement(topology: Topology, bundle: int, resources: dict[str, float], name: str) -> dict:
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
            LearnerActor.options(**_placement(topology, bundle, resources, f"learner-{rank}"))
            .remote(job, rank, self.world_size)
            for rank, bundle in enumerate(topology.learner_bundles)
        ]  # fmt: skip
        self.timeout_s = cluster.call_timeout_s
        try:
            # Rank 0's node hosts the rendezvous; every rank joins with the same address and port.
            master_addr, master_port = ray.get(self.actors[0].master_address.remote(),
                                               timeout=cluster.start_timeout_s)  # fmt: skip
            self._all(lambda a: a.init_process_group.remote(master_addr, master_port),
                      timeout=cluster.start_timeout_s)  # fmt: skip
        except BaseException:
            self.kill()  # a half-formed group holds its bundles for nothing
            raise

    def _all(self, call, timeout: float | None = None) -> list[Any]:
        """call(actor) -> ObjectRef on every rank, then wait for all of them."""
        return ray.get([call(actor) for actor in self.actors], timeout=timeout or self.timeout_s)

    def setup_stage(self, stage_index: int) -> None:
        self._all(lambda a: a.setup_stage.remote(stage_index))

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One colocated step, rank r on batches[r]; metrics are global (all-reduced)."""
        self._check_shards(batches)
        return self._get([a.train_step.remote(b) for a, b in zip(self.actors, batches)])[0]

    def train_on_inputs(self, inputs: list[ray.ObjectRef | SoarInputs]) -> dict[str, float]:
        """One step on rollout-prepared inputs, rank r on inputs[r]."""
        self._check_shards(inputs)
        return self._get([a.train_on_inputs.remote(x) for a, x in zip(self.actors, inputs)])[0]

    def _check_shards(self, shards: list[Any]) -> None:
        if len(shards) != self.world_size:
            raise ValueError(f"{len(shards)} shards for {self.world_size} learners")

    def _get(self, refs: list[ray.ObjectRef]) -> list[Any]:
        return ray.get(refs, timeout=self.timeout_s)

    def export_weights(self) -> ray.ObjectRef:
        """Rank 0's trainable weights as an ObjectRef (every rank takes part: ZeRO-3 gathers)."""
        refs = [actor.export_weights.remote() for actor in self.actors]
        ray.get(refs[1:], timeout=self.timeout_s)  # the other ranks only join the gather
        return refs[0]

    def save_checkpoint(self, folder: Path) -> None:
        self._all(lambda a: a.save_checkpoint.remote(str(folder)))

    def load_checkpoint(self, folder: Path) -> None:
        self._all(lambda a: a.load_checkpoint.remote(str(folder)))

    def save_transformer(self, path: Path) -> Path:
        saved = self._all(lambda a: a.save_transformer.remote(str(path)))
        return Path(saved[0])

    def generate_images(self, prompts: list[str], **kwargs: Any) -> np.ndarray:
        """Rank 0's images; every rank renders (ZeRO-3 gathers are collective)."""
        return self._all(lambda a: a.generate_images.remote(prompts, **kwargs))[0]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class RolloutPool:
    """M rollout actors holding inference copies; work is spread round-robin."""

    def __init__(self, job: JobConfig, topology: Topology) -> None:
        cluster = job.cluster
        resources = rollout_resources(cluster)
        self.actors = [
            RolloutActor.options(
                **_placement(topology, bundle, resources, f"rollout-{index}"),
                max_restarts=cluster.max_actor_restarts,
            ).remote(job, index)  # fmt: skip
            for index, bundle in enumerate(topology.rollout_bundles)
        ]
        self.timeout_s = cluster.call_timeout_s

    def __len__(self) -> int:
        return len(self.actors)

    def set_stage(self, stage_index: int) -> None:
        ray.get([a.set_stage.remote(stage_index) for a in self.actors], timeout=self.timeout_s)

    def load_weights(self, weights: ray.ObjectRef, version: int) -> list[ray.ObjectRef]:
        """Queue the weights on every worker; calls on an actor run in order, so work submitted
        after this sees the new version."""
        return [actor.load_weights.remote(weights, version) for actor in self.actors]

    def prepare_soar(self, batches: list[dict[str, Any]]) -> list[ray.ObjectRef]:
        """One (SoarInputs, version) ref per learner rank, spread over the workers."""
        refs = []
        for rank, batch in enumerate(batches):
            actor = self.actors[rank % len(self.actors)]
            refs.append(actor.prepare_soar.options(num_returns=2).remote(batch))
        return refs

    def generate_images(self, prompts: list[str], **kwargs: Any) -> np.ndarray:
        return ray.get(self.actors[0].generate_images.remote(prompts, **kwargs),
                       timeout=self.timeout_s)  # fmt: skip

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
