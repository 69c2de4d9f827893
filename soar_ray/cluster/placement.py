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
    """Raise ConfigError when the bundles can never be placed on the running cluster."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problem = placement_problem(cluster.placement_strategy, bundles, nodes)
    if problem:
        raise ConfigError(problem)


def placement_problem(strategy: str, bundles: list[Bundle], nodes: list[Bundle]) -> str | None:
    """Why `bundles` can never be placed under `strategy` on nodes of these total resources (one
    line naming the fields to change), or None. Exact for the STRICT strategies; for PACK and
    SPREAD, Ray may still wait when every bundle fits some node but not all fit together."""
    fields = {
        "GPU": "cluster.num_learners x cluster.gpus_per_learner + rollout and reward GPUs",
        "CPU": "cluster.num_learners x cluster.cpus_per_learner + rollout and reward CPUs",
    }
    whole = {key: sum(b.get(key, 0.0) for b in bundles) for key in ("GPU", "CPU")}
    for key, need in whole.items():
        have = sum(node.get(key, 0.0) for node in nodes)
        if need > have + 1e-9:
            return (f"{fields[key]}: the job needs {need:g} {key} but the Ray cluster has "
                    f"{have:g}; lower the counts or add nodes")  # fmt: skip
    if strategy == "STRICT_PACK":
        if any(_fits(whole, node) for node in nodes):
            return None
        return (f"cluster.placement_strategy: STRICT_PACK puts the whole job {_short(whole)} on "
                f"one node, and the largest nodes have {_short(_largest(nodes))}; use PACK, or "
                "a node that large")  # fmt: skip
    if strategy == "STRICT_SPREAD":
        placed = _distinct_nodes(bundles, nodes)
        if placed == len(bundles):
            return None
        return (f"cluster.placement_strategy: STRICT_SPREAD puts each of the job's {len(bundles)} "
                f"bundles (learners, rollout workers, reward actors) on a node of its own, and "
                f"the {len(nodes)} nodes can take at most {placed} of them; use SPREAD, or add "
                "nodes")  # fmt: skip
    for bundle in bundles:
        if not any(_fits(bundle, node) for node in nodes):
            return (f"cluster.gpus_per_learner / cpus_per_learner: no node can hold the bundle "
                    f"{_short(bundle)}; the largest nodes have {_short(_largest(nodes))}")  # fmt: skip
    return None


def _fits(bundle: Bundle, node: Bundle) -> bool:
    return all(node.get(key, 0.0) >= value - 1e-9 for key, value in bundle.items())


def _distinct_nodes(bundles: list[Bundle], nodes: list[Bundle]) -> int:
    """The most bundles placed on distinct nodes that hold them (bipartite matching by
    augmenting paths)."""
    owner: dict[int, int] = {}  # node -> bundle on it

    def place(bundle: int, seen: set[int]) -> bool:
        for node in range(len(nodes)):
            if node in seen or not _fits(bundles[bundle], nodes[node]):
                continue
            seen.add(node)
            if node not in owner or place(owner[node], seen):
                owner[node] = bundle
                return True
        return False

    return sum(place(bundle, set()) for bundle in range(len(bundles)))


def _short(bundle: Bundle) -> Bundle:
    return {key: value for key, value in bundle.items() if value}


def _largest(nodes: list[Bundle]) -> Bundle:
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
