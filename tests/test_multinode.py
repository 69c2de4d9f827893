"""A multi-node topology on one machine: a `ray.cluster_utils.Cluster` of a head (the driver's
node, no CPUs for the job) and four worker nodes, each labelled by a custom resource (`node_a`
...), every server on 127.0.0.1, with the session's token. The tiny chain job (SOAR on two
ZeRO-2 learners on gloo with a disaggregated rollout worker making the aux points, then two
Flow-GRPO epochs scored by the JPEG-compressibility reward actor) runs with
`cluster.placement_strategy: STRICT_SPREAD`: the learners, the rollout worker and the reward
actor land on four different nodes, none on the driver's; learner-1 reaches the rendezvous store
at rank 0's node address, served by rank 0's own process; the weights reach the rollout worker's
node over the collective weight group (`cluster.weight_sync: collective`, gloo); both ranks write
one checkpoint in the shared folder. Then, in the SOAR stage, the node holding learner-1 is lost mid-step (its
processes SIGKILLed, as when a machine dies) while learner-0 waits on learner-1 in a collective,
so that learner-0's own error comes before Ray reports the loss: the run stops in one line
naming learner-1 (not learner-0's error) and the checkpoint `resume: auto` continues from. A
replacement node joins, and the next run (`resume: auto`) continues from that checkpoint on it
and finishes both stages, one metrics row per SOAR step and per GRPO epoch.

A Cluster needs a Ray of its own, while this process keeps the session's embedded Ray
(`ray_local`) for the other tests: the scenario runs in a child process (this file run as a
script), which writes what it saw to a JSON report that the tests below read.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
WORKER_NODES = ("node_a", "node_b", "node_c", "node_d")
REPLACEMENT = "node_e"
NUM_STEPS = 10
NUM_EPOCHS = 2
REWARD_ACTOR = "reward-jpeg_compressibility-0"
OVERRIDES = [
    "data.synthetic.num_images=32", "logging.progress_bar=false", "logging.tensorboard=false",
    "logging.sample_every=0", "cluster.placement_strategy=STRICT_SPREAD",
    "stages.0.mode=disaggregated", "stages.0.max_staleness=1", f"stages.0.num_steps={NUM_STEPS}",
    # The weights reach the rollout worker over the collective group, across nodes (gloo here).
    "cluster.weight_sync=collective",
    "checkpoint.every=2", "cluster.start_timeout_s=300",
    # GRPO as small as it runs: 4 images of 2 SDE steps an epoch, one rollout call, one update of
    # one micro-batch a rank, no evaluation (so no held-out reward actor); it checkpoints once,
    # at its end (its checkpoint_every is 10).
    f"stages.1.num_epochs={NUM_EPOCHS}", "stages.1.eval_every=0", "stages.1.eval_rewards=[]",
    "cluster.reward_actors={jpeg_compressibility: {num_cpus: 0.25}}", "stages.1.group_size=2",
    "stages.1.num_groups_per_epoch=2", "stages.1.num_sampling_steps=2",
    "stages.1.sample_batch_size=4", "stages.1.train_batch_size=2", "stages.1.num_inner_epochs=1",
]  # fmt: skip
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
"""The head counts a node dead ~1.5 s after it stops answering (Ray's default: ~15 s), so the
replacement can join at once without the next run's placement group landing on the lost node."""


# ---- the scenario, in the child process ----------------------------------------------------------


def node_of(_worker) -> tuple[str, int]:
    """(Ray node id, process id) of the actor it runs in (through the actors' generic `call`)."""
    import ray

    return ray.get_runtime_context().get_node_id(), os.getpid()


def store_address(_learner) -> tuple[str, int]:
    """The rendezvous store this rank's process group reached: (host, port)."""
    from torch.distributed import distributed_c10d

    # The default group's store is a PrefixStore around the TCPStore the learner joined.
    store = distributed_c10d._get_default_store().underlying_store
    return store.host, store.port


def _rows(run_dir: Path) -> list[dict]:
    """The run's metrics rows, in order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(run_dir: Path) -> list[int]:
    """Steps of the SOAR stage's rows."""
    return [row["step"] for row in _rows(run_dir) if row["stage"] == "soar"]


def _wait_until(done, what: str, timeout_s: float = 360.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:g} s")
        time.sleep(0.02)


def _wait_for_step(run_dir: Path, step: int, thread: threading.Thread, result: dict) -> None:
    """Until the run has logged `step`; an error (with the run's outcome) if it ended before."""
    _wait_until(lambda: max(_steps(run_dir), default=0) >= step or not thread.is_alive(),
                f"the run logged no step {step}")  # fmt: skip
    if max(_steps(run_dir), default=0) < step:
        raise RuntimeError(f"the run ended before step {step}: {result}")


def _start(job, run_dir: Path) -> tuple[threading.Thread, dict]:
    """The run in a thread (this process stays its Ray driver); its outcome lands in `result`."""
    from soar_ray.stages.pipeline import run_pipeline

    result = {}

    def target():
        try:
            result["outputs"] = [str(path) for path in run_pipeline(job, run_dir)]
        except BaseException as exc:  # reported to the tests, which assert on it
            result["error"] = (type(exc).__name__, str(exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _labels() -> dict[str, str]:
    """Ray node id -> the node's label (its custom resource), `head` for the head."""
    import ray

    labels = {}
    for node in ray.nodes():
        names = [key for key in node["Resources"] if key.startswith("node_")]
        labels[node["NodeID"]] = names[0] if names else "head"
    return labels


def _actor(name: str, thread: threading.Thread, result: dict):
    """The named actor, once the run has made it; an error (with the run's outcome) if the run
    ended before."""
    import ray

    found = []

    def made() -> bool:
        try:
            found.append(ray.get_actor(name))
        except ValueError:  # not made yet
            return not thread.is_alive()
        return True

    _wait_until(made, f"the run made no actor {name}")
    if not found:
        raise RuntimeError(f"the run ended before it made {name}: {result}")
    return found[0]


def _reward_node(name: str, thread: threading.Thread, result: dict) -> tuple[str, int]:
    """(Ray node id, process id) of a reward actor. It has no generic `call`: its process id comes
    from the actor, its node from Ray's record of the live actor with that name and process."""
    import ray
    from ray._private import state

    pid = ray.get(_actor(name, thread, result).pid.remote(), timeout=180)
    records = state.actors(actor_state_name="ALIVE").values()
    alive = {actor["Pid"]: actor["Address"]["NodeID"] for actor in records if actor["Name"] == name}
    if pid not in alive:
        raise RuntimeError(f"Ray records no live {name} with pid {pid}: {alive}")
    return alive[pid], pid


def _placement(thread: threading.Thread, result: dict) -> dict[str, dict]:
    """Where the running job's actors run: name -> node label, node id, pid."""
    import ray

    labels, placed = _labels(), {}
    for name in ("learner-0", "learner-1", "rollout-0", REWARD_ACTOR):
        if name == REWARD_ACTOR:
            node_id, pid = _reward_node(name, thread, result)
        else:
            actor = _actor(name, thread, result)
            node_id, pid = ray.get(actor.call.remote(node_of), timeout=180)
        placed[name] = {"node": labels[node_id], "node_id": node_id, "pid": pid}
    return placed


def _rendezvous(placed: dict[str, dict]) -> dict:
    """The store learner-1 reached, the address of rank 0's node, and who listens on that port."""
    import psutil
    import ray

    host, port = ray.get(ray.get_actor("learner-1").call.remote(store_address), timeout=60)
    rank0_node = next(n for n in ray.nodes() if n["NodeID"] == placed["learner-0"]["node_id"])
    listening = sorted({(c.laddr.ip, c.pid) for c in psutil.net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN and c.laddr.port == port})  # fmt: skip
    return {"store": [host, port], "rank0_node_address": rank0_node["NodeManagerAddress"],
            "listening": listening}  # fmt: skip


def scenario(cluster, nodes: dict, root: Path) -> dict:
    """Run, lose the node of learner-1 mid-run, add a replacement, resume; what was seen."""
    import ray

    from soar_ray.checkpoint import CheckpointManager
    from soar_ray.config import load_job

    run_dir = root / "run"
    job = load_job(str(REPO / "jobs/tiny_soar_grpo.yaml"), [f"output_dir={run_dir}", *OVERRIDES])
    report = {"driver_node": _labels()[ray.get_runtime_context().get_node_id()]}

    thread, result = _start(job, run_dir)
    _wait_for_step(run_dir, 1, thread, result)
    placed = _placement(thread, result)
    report["first"] = {"placement": placed, "rendezvous": _rendezvous(placed)}
    # Right after a row is logged (past step 2, whose checkpoint is then complete) the learners
    # start the next step's collectives: learner-1 is frozen there, and half a second later
    # learner-0 waits on it when the node goes, and its error comes before Ray reports the loss. The node's processes and
    # learner-1 are then SIGKILLed, as when a machine dies.
    _wait_for_step(run_dir, max([*_steps(run_dir), 2]) + 1, thread, result)
    lost, pid = placed["learner-1"]["node"], placed["learner-1"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.5)
    cluster.remove_node(nodes.pop(lost), allow_graceful=False)
    os.kill(pid, signal.SIGKILL)
    removed = time.monotonic()
    thread.join(timeout=120)
    checkpoints = CheckpointManager(job.checkpoint_path, job.checkpoint.keep_last)
    report["lost"] = {
        "node": lost, "alive": thread.is_alive(), "seconds": time.monotonic() - removed,
        "result": result, "steps": _steps(run_dir),
        "complete": {folder.name: sorted(p.name for p in (folder / "learners").iterdir())
                     for _, folder in checkpoints.complete()},
    }  # fmt: skip
    if thread.is_alive():
        return report

    lost_id = placed["learner-1"]["node_id"]
    _wait_until(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == lost_id),
                "Ray did not count the lost node dead", timeout_s=60)  # fmt: skip
    nodes[REPLACEMENT] = cluster.add_node(num_cpus=1, resources={REPLACEMENT: 1},
                                          node_ip_address=LOOPBACK)  # fmt: skip
    thread, result = _start(job, run_dir)
    # The first run's actors are gone by now: these are the resumed run's.
    report["resumed"] = {"placement": _placement(thread, result)}
    thread.join(timeout=180)
    report["resumed"] |= {"alive": thread.is_alive(), "result": result, "rows": _rows(run_dir)}
    return report


def main(root: Path) -> None:
    """Start the cluster, run the scenario, write root/report.json; the cluster goes at the end."""
    import ray
    import torch
    from ray.cluster_utils import Cluster

    torch.set_num_threads(1)  # two cores shared by every node's processes
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False,
        "_system_config": HEALTH_CHECKS,
    })  # fmt: skip
    try:
        nodes = {label: cluster.add_node(num_cpus=1, resources={label: 1},
                                         node_ip_address=LOOPBACK)
                 for label in WORKER_NODES}  # fmt: skip
        ray.init(address=cluster.address, log_to_driver=False)
        report = scenario(cluster, nodes, root)
    finally:
        ray.shutdown()
        cluster.shutdown()
    (root / "report.json").write_text(json.dumps(report, indent=1))


# ---- the tests, in the pytest process ------------------------------------------------------------


@pytest.fixture(scope="module")
def multinode() -> Iterator[dict]:
    """The child's report, with its printed output under `out`."""
    # A short folder: Ray's unix socket paths under it must stay below 108 bytes. RAY_TMPDIR puts
    # the cluster's sessions and its address file there too, out of /tmp/ray.
    root = Path(tempfile.mkdtemp(prefix="soar-ray-mn-"))
    try:
        child = subprocess.run([sys.executable, __file__, str(root)], cwd=REPO, text=True,
                               env={**os.environ, "RAY_TMPDIR": str(root)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=420)  # fmt: skip
        assert child.returncode == 0, child.stdout[-6000:]
        report = json.loads((root / "report.json").read_text())
        report["out"] = child.stdout
        yield report
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_learners_spread_over_nodes_and_rank_0_serves_the_rendezvous(multinode):
    placed = multinode["first"]["placement"]
    assert multinode["driver_node"] == "head"
    nodes = {name: where["node"] for name, where in placed.items()}
    # STRICT_SPREAD: four bundles (two learners, the rollout worker, the reward actor), four
    # nodes; the head has no CPU for the job.
    assert sorted(nodes) == sorted(["learner-0", "learner-1", "rollout-0", REWARD_ACTOR])
    assert sorted(nodes.values()) == sorted(WORKER_NODES), nodes
    rendezvous = multinode["first"]["rendezvous"]
    host, port = rendezvous["store"]
    # learner-1 reached the store at rank 0's node address, where rank 0's process alone listens.
    assert host == rendezvous["rank0_node_address"] == LOOPBACK
    assert rendezvous["listening"] == [[LOOPBACK, placed["learner-0"]["pid"]]], rendezvous
    # Both ranks, on two nodes, wrote their state into the one shared checkpoint folder.
    complete = multinode["lost"]["complete"]
    assert complete and all({"rank-00000.pt", "rank-00001.pt", "engine"} <= set(files)
                            for files in complete.values()), complete  # fmt: skip


def test_a_lost_node_stops_the_run_naming_its_learner_and_the_resume_point(multinode):
    lost, placed = multinode["lost"], multinode["first"]["placement"]
    assert not lost["alive"], "the run did not stop after its node was lost"
    assert lost["seconds"] < 60, lost
    kind, message = lost["result"]["error"]
    assert kind == "LearnerFailed", message
    assert "\n" not in message
    pid = placed["learner-1"]["pid"]
    # learner-1 alone is named lost (several would be listed before "died").
    named = rf"learner-1 \(pid {pid} on 127\.0\.0\.1\) died during Learner\.\w+ \("
    assert re.match(named, message), message
    # learner-0's collective failed first; its error is not what the run reports.
    assert "the run stops (learner-0's RuntimeError followed from it); " in message
    resume = r"checkpoint\.resume: auto continues from stage soar step (\d+) \("
    step = int(re.search(resume, message)[1])
    assert step >= 2 and step % 2 == 0
    assert f"step-00-{step:07d}" in lost["complete"]
    assert max(lost["steps"]) < NUM_STEPS


def test_resume_auto_on_a_replacement_node_finishes_both_stages_once(multinode):
    assert "resumed" in multinode, "the first run did not stop: nothing to resume"
    resumed = multinode["resumed"]
    assert not resumed["alive"] and "error" not in resumed["result"], resumed["result"]
    step = int(re.search(r"continues from stage soar step (\d+) ",
                         multinode["lost"]["result"]["error"][1])[1])  # fmt: skip
    assert re.search(rf"resumed from \S+step-00-{step:07d} \(stage soar, step {step}\)",
                     multinode["out"])  # fmt: skip
    # Both runs pushed the weights to the rollout worker's node over the collective group, whose
    # store learner-0 serves on its own node's address.
    formed = re.findall(r"soar-ray: weight sync: collective \(gloo\), learner-0 and 1 rollout "
                        rf"workers, rendezvous at {re.escape(LOOPBACK)}:\d+", multinode["out"])  # fmt: skip
    assert len(formed) >= 2, multinode["out"][-3000:]
    rows = resumed["rows"]
    assert [(row["stage"], row["step"]) for row in rows] == (
        [("soar", s) for s in range(1, NUM_STEPS + 1)]
        + [("grpo", e) for e in range(1, NUM_EPOCHS + 1)]
    )
    # The reward actor scored every GRPO epoch's rollouts.
    assert all(math.isfinite(row["reward_mean"]) for row in rows if row["stage"] == "grpo"), rows
    nodes = sorted(where["node"] for where in resumed["placement"].values())
    lost = multinode["lost"]["node"]
    assert nodes == sorted({*WORKER_NODES, REPLACEMENT} - {lost}), nodes
    outputs = resumed["result"]["outputs"]
    assert [Path(output).parent.name for output in outputs] == ["soar", "grpo"], outputs
    assert all((Path(output) / "config.json").is_file() for output in outputs), outputs


if __name__ == "__main__":
    main(Path(sys.argv[1]))
