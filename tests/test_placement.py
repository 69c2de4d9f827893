"""Whether a job's bundles can ever be placed, decided before any actor starts: totals, one node
for STRICT_PACK, a node each for STRICT_SPREAD, and each bundle on some node otherwise."""

import pytest

from soar_ray.cluster.placement import check_fits, placement_problem, plan_bundles
from soar_ray.config import ClusterConfig, ConfigError

GPU_NODE = {"GPU": 8.0, "CPU": 64.0}
CPU_NODE = {"CPU": 16.0}
HEAD = {"memory": 1e9}  # a head node that takes no work: no CPU, no GPU


def test_totals_name_the_fields():
    problem = placement_problem("PACK", [{"GPU": 1.0, "CPU": 8.0}] * 9, [GPU_NODE, CPU_NODE])
    assert problem == (
        "cluster.num_learners x cluster.gpus_per_learner + rollout and reward GPUs: the job "
        "needs 9 GPU but the Ray cluster has 8; lower the counts or add nodes"
    )


def test_pack_and_spread_need_each_bundle_on_some_node():
    # 8 + 16 CPUs in all, but no node holds a 20-CPU bundle.
    problem = placement_problem("SPREAD", [{"CPU": 20.0}], [{"CPU": 8.0}, CPU_NODE])
    assert problem is not None and "no node can hold the bundle {'CPU': 20.0}" in problem
    assert "the largest nodes have {'CPU': 16.0}" in problem
    two_nodes = [{"CPU": 8.0}, CPU_NODE]
    assert placement_problem("PACK", [{"CPU": 8.0}, {"CPU": 16.0}], two_nodes) is None


def test_strict_pack_needs_one_node_for_the_whole_job():
    bundles = [{"GPU": 1.0, "CPU": 8.0}] * 4  # 4 GPUs, 32 CPUs
    two_halves = [{"GPU": 2.0, "CPU": 16.0}] * 2  # the totals fit, no single node does
    problem = placement_problem("STRICT_PACK", bundles, two_halves)
    assert problem == (
        "cluster.placement_strategy: STRICT_PACK puts the whole job {'GPU': 4.0, 'CPU': 32.0} on "
        "one node, and the largest nodes have {'GPU': 2.0, 'CPU': 16.0}; use PACK, or a node "
        "that large"
    )
    assert placement_problem("STRICT_PACK", bundles, [HEAD, GPU_NODE]) is None


def test_strict_spread_needs_a_node_for_each_bundle():
    bundles = [{"CPU": 1.0}] * 4
    problem = placement_problem("STRICT_SPREAD", bundles, [HEAD, CPU_NODE, CPU_NODE, CPU_NODE])
    assert problem == (
        "cluster.placement_strategy: STRICT_SPREAD puts each of the job's 4 bundles (learners, "
        "rollout workers, reward actors) on a node of its own, and the 4 nodes can take at most "
        "3 of them; use SPREAD, or add nodes"
    )
    assert placement_problem("STRICT_SPREAD", bundles, [HEAD] + [CPU_NODE] * 4) is None


def test_strict_spread_matches_bundles_to_the_nodes_that_hold_them():
    # Three nodes and CPUs enough for three bundles, but both 2-CPU bundles need the one node
    # larger than 1 CPU.
    nodes = [{"CPU": 4.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    bundles = [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 1.0}]
    assert "can take at most 2 of them" in placement_problem("STRICT_SPREAD", bundles, nodes)
    # A greedy first fit puts the 1-CPU bundle on the big node first; the matching moves it.
    bundles = [{"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 1.0}]
    assert placement_problem("STRICT_SPREAD", bundles, nodes) is None


def test_check_fits_reads_the_running_cluster(ray_local):
    # The session's Ray is one node: two learners cannot each have a node of their own.
    cluster = ClusterConfig(num_learners=2, gpus_per_learner=0, cpus_per_learner=0.25,
                            num_rollout_workers=0, placement_strategy="STRICT_SPREAD")  # fmt: skip
    bundles = plan_bundles(cluster)[0]
    with pytest.raises(ConfigError, match="STRICT_SPREAD puts each of the job's 2 bundles"):
        check_fits(cluster, bundles)
    check_fits(cluster.model_copy(update={"placement_strategy": "STRICT_PACK"}), bundles)
