"""One placement group per job: a bundle per learner (GPU or CPU), per rollout worker and per
reward-scoring actor.

With `cluster.colocate_rollout_with_learners`, rollout workers share the learners' bundles
(fractional GPUs) instead of getting their own. Reward actors get a bundle each, sized by
`cluster.reward_actors.<name>`, so the whole job holds its resources from the start. The request is checked against the cluster before
anything starts, so a topology that cannot fit is an error naming the config fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from soar_ray.config import ClusterConfig, ConfigError, RewardActorsConfig

Bundle = dict[str, float]


@dataclass(frozen=True)
class Topology:
    """The placement group and which bundle each learner, rollout worker and reward actor uses."""

    group: PlacementGroup
    learner_bundles: list[int]
    rollout_bundles: list[int]
    reward_bundles: dict[str, list[int]] = field(default_factory=dict)
    """Reward name -> the bundle of each of its scoring actors."""

    def remove(self) -> None:
        remove_placement_group(self.group)


def _resources(gpus: float, cpus: float) -> Bundle:
    return {key: value for key, value in (("GPU", gpus), ("CPU", cpus)) if value > 0}


def learner_resources(cluster: ClusterConfig) -> Bundle:
    return _resources(cluster.gpus_per_learner, cluster.cpus_per_learner)


def rollout_resources(cluster: ClusterConfig) -> Bundle:
    gpus = cluster.gpus_per_rollout_worker if cluster.gpus_per_learner > 0 else 0.0
    return _resources(gpus, cluster.cpus_per_rollout_worker)


def reward_resources(cluster: ClusterConfig, reward: str) -> Bundle:
    spec = cluster.reward_actors.get(reward, RewardActorsConfig())
    return _resources(spec.num_gpus, spec.num_cpus)


def plan_bundles(
    cluster: ClusterConfig, rewards: Sequence[str] = ()
) -> tuple[list[Bundle], list[int], list[int], dict[str, list[int]]]:
    """Bundles and the bundle index of every learner, rollout worker and reward actor."""
    learner = learner_resources(cluster)
    bundles = [dict(learner) for _ in range(cluster.num_learners)]
    learner_bundles = list(range(cluster.num_learners))
    rollout = rollout_resources(cluster)
    if cluster.colocate_rollout_with_learners:
        rollout_bundles = [i % cluster.num_learners for i in range(cluster.num_rollout_workers)]
        for index in rollout_bundles:
            for key, value in rollout.items():
                bundles[index][key] = bundles[index].get(key, 0.0) + value
    else:
        start = len(bundles)
        bundles += [dict(rollout) for _ in range(cluster.num_rollout_workers)]
        rollout_bundles = list(range(start, start + cluster.num_rollout_workers))
    reward_bundles = {}
    for reward in rewards:
        num_actors = cluster.reward_actors.get(reward, RewardActorsConfig()).num_actors
        reward_bundles[reward] = list(range(len(bundles), len(bundles) + num_actors))
        bundles += [reward_resources(cluster, reward) for _ in range(num_actors)]
    return bundles, learner_bundles, rollout_bundles, reward_bundles


def check_fits(cluster: ClusterConfig, bundles: list[Bundle]) -> None:
    """Raise ConfigError when the bundles cannot be placed on the running cluster."""
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fields = {
        "GPU": "cluster.num_learners x cluster.gpus_per_learner + rollout and reward GPUs",
        "CPU": "cluster.num_learners x cluster.cpus_per_learner + rollout and reward CPUs",
    }
    for key in ("GPU", "CPU"):
        need = sum(b.get(key, 0.0) for b in bundles)
        have = total.get(key, 0.0)
        if need > have + 1e-9:
            raise ConfigError(
                f"{fields[key]}: the job needs {need:g} {key} but the Ray cluster has {have:g}; "
                "lower the counts or add nodes"
            )
    if cluster.placement_strategy in ("STRICT_PACK",):
        return  # one node must hold everything: the totals check above is the node check
    for bundle in bundles:
        if not any(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes):
            raise ConfigError(
                f"cluster.gpus_per_learner / cpus_per_learner: no node can hold the bundle "
                f"{bundle}; the largest nodes have {_largest(nodes)}"
            )


def _largest(nodes: list[dict[str, float]]) -> Bundle:
    return {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in ("GPU", "CPU")}


def create_topology(
    cluster: ClusterConfig, rewards: Sequence[str] = (), name: str = "soar_ray"
) -> Topology:
    """Reserve the job's placement group (`name` on the dashboard); waits up to
    `cluster.start_timeout_s`."""
    bundles, learner_bundles, rollout_bundles, reward_bundles = plan_bundles(cluster, rewards)
    check_fits(cluster, bundles)
    group = placement_group(bundles, strategy=cluster.placement_strategy, name=name)
    ready, _ = ray.wait([group.ready()], timeout=cluster.start_timeout_s)
    if not ready:
        remove_placement_group(group)
        raise TimeoutError(
            f"cluster.start_timeout_s: the placement group {bundles} was not placed within "
            f"{cluster.start_timeout_s:g} s; the cluster may be busy or too small"
        )
    return Topology(group, learner_bundles, rollout_bundles, reward_bundles)
