"""Faults injected into real runs of the tiny job on the session's Ray (two ZeRO-2 learners on
gloo): a learner stopped with SIGSTOP is reported stalled, by name, within its deadline, and the
run stops saying where `resume: auto` continues; a learner killed with SIGKILL under
`cluster.max_job_restarts` makes the run restart from its last checkpoint and finish, with one
metrics row per step; a rollout worker killed with SIGKILL is restored (stage, weights) and its
lost calls rerun, so GRPO and disaggregated SOAR finish every step, while a worker's own exception
still stops the run; a disk that fills during a checkpoint stops the run and the next run removes
the debris and resumes from the checkpoint before."""

import json
import os
import re
import signal
import threading
import time

import pytest
import ray

from soar_ray.config import load_job
from soar_ray.errors import LearnerFailed
from soar_ray.stages.pipeline import run_pipeline

pytestmark = pytest.mark.slow

FAST = ["data.synthetic.num_images=32", "logging.progress_bar=false", "logging.tensorboard=false",
        "logging.sample_every=0"]  # fmt: skip


def _job(run_dir, *overrides):
    return load_job("jobs/tiny.yaml", [f"output_dir={run_dir}", *FAST, *overrides])


def _steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _start(job, run_dir):
    """The run in a thread (this process stays its Ray driver); its outcome lands in `result`."""
    result = {}

    def target():
        try:
            result["outputs"] = run_pipeline(job, run_dir)
        except BaseException as exc:  # handed to the test, which asserts on it
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _learner_pid_after_step(run_dir, rank, step, timeout_s=180):
    """The pid of learner `rank` (asked after the run's first step: the question waits in the
    actor's queue behind the train calls the driver has queued), once the run has logged `step`
    (the learners are then in a later step's train call; checkpoints here come every 4 steps)."""
    deadline = time.monotonic() + timeout_s

    def wait_for(target):
        while max(_steps(run_dir), default=0) < target:
            assert time.monotonic() < deadline, f"the run did not reach step {target}"
            time.sleep(0.02)

    wait_for(1)
    pid = ray.get(ray.get_actor(f"learner-{rank}").node.remote(), timeout=60)[2]
    wait_for(step)
    return pid


def test_a_stopped_learner_is_named_stalled_and_the_run_says_where_to_resume(ray_local, tmp_path):
    job = _job(tmp_path, "stages.0.num_steps=200", "checkpoint.every=4",
               "cluster.stall_timeout_s=5")  # fmt: skip
    thread, result = _start(job, tmp_path)
    pid = _learner_pid_after_step(tmp_path, 1, 5)
    os.kill(pid, signal.SIGSTOP)
    try:
        thread.join(timeout=120)
    finally:
        os.kill(pid, signal.SIGCONT)  # for the kill at teardown, should the run still hold it
    assert not thread.is_alive()
    error = result["error"]
    assert isinstance(error, LearnerFailed), error
    message = str(error)
    assert f"learner-1 (pid {pid} on 127.0.0.1)" in message
    assert "no answer to Learner.train" in message and "cluster.stall_timeout_s 5 s" in message
    step = int(re.search(r"auto continues from stage \S+ step (\d+) \(", message).group(1))
    assert step >= 4 and step % 4 == 0
    assert (tmp_path / "checkpoints" / f"step-00-{step:07d}").is_dir()


def test_a_killed_learner_restarts_the_run_from_its_last_checkpoint(ray_local, tmp_path, capsys):
    job = _job(tmp_path, "stages.0.num_steps=14", "checkpoint.every=4",
               "cluster.max_job_restarts=1")  # fmt: skip
    thread, result = _start(job, tmp_path)
    pid = _learner_pid_after_step(tmp_path, 0, 5)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in result, result
    out = capsys.readouterr().out
    assert re.search(rf"learner-0 \(pid {pid} on 127\.0\.0\.1\) died during Learner\.train", out)
    step = int(re.search(r"restarting from stage \S+ step (\d+) .*\(restart 1 of 1\)", out)[1])
    assert step % 4 == 0 and step >= 4
    # The rows past the checkpoint the first attempt wrote are taken back: one row per step.
    assert _steps(tmp_path) == list(range(1, 15))
    assert (result["outputs"][0] / "config.json").is_file()


# ---- rollout workers: restarted by Ray, restored by the pool -------------------------------------


def _rollout_pid(name="rollout-0"):
    return ray.get(ray.get_actor(name).pid.remote(), timeout=60)


def _kill_after(run_dir, step, name="rollout-0", timeout_s=180):
    """SIGKILL the rollout worker `name` once the run has logged `step`; returns its pid."""
    deadline = time.monotonic() + timeout_s
    while max(_steps(run_dir), default=0) < step:
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.05)
    pid = _rollout_pid(name)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_rollout_worker_is_restored_and_the_grpo_stage_finishes(ray_local, tmp_path,
                                                                          capsys):  # fmt: skip
    from soar_ray.build import build_sd3
    from soar_ray.stages.context import StageContext
    from soar_ray.stages.grpo import run_grpo_stage
    from soar_ray.stages.loop import StageStart
    from soar_ray.workers.learner import Learner
    from soar_ray.workers.rollout import RolloutWorker

    job = load_job("jobs/tiny_grpo.yaml", [
        f"output_dir={tmp_path}", *FAST, "stages.0.num_epochs=4", "stages.0.eval_every=0",
        "stages.0.ema.enabled=false", "stages.0.checkpoint_every=1000", "checkpoint.every=1000",
        "cluster.num_rollout_workers=2",
    ])  # fmt: skip
    ctx = StageContext(job, tmp_path)
    try:
        ctx.start_stage(0, handoff=False)
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            out=run_grpo_stage(ctx, 0, StageStart(None, 0))), daemon=True)  # fmt: skip
        thread.start()
        pid = _kill_after(tmp_path, 1)
        thread.join(timeout=300)
        assert not thread.is_alive() and "out" in result
        assert _steps(tmp_path) == [1, 2, 3, 4]  # every epoch, once
        assert re.search(r"rollout-0 was lost during RolloutWorker\.\w+ \(.+\): restoring it and "
                         r"running the call again \(retry 1 of 3\)", capsys.readouterr().out)  # fmt: skip
        assert _rollout_pid() != pid
        # The restored worker holds the learners' weights at the final version: its images are
        # the healthy worker's, bit for bit, and the learners' own.
        prompts = ["a red circle on a blue background", 'a sign that says "SOAR"']
        kwargs = {"height": 64, "width": 64, "num_steps": 4, "guidance": 4.5, "seeds": [1, 2]}
        calls = [ctx.rollouts.submit(RolloutWorker.generate_images, prompts, **kwargs)
                 for _ in range(2)]  # fmt: skip
        assert sorted(call.actor for call in calls) == [0, 1]
        restored, healthy = (
            ctx.rollouts.get(call) for call in sorted(calls, key=lambda c: c.actor)
        )
        assert (restored == healthy).all()
        # The learners' weights at the final version, in a worker built here (learners hold no
        # text encoders to render with).
        reference = RolloutWorker(job, build_sd3(job), seed=0)
        reference.set_stage(0)
        reference.load_weights(ray.get(ctx.learners.first(Learner.export_weights)), 8)
        assert (reference.generate_images(prompts, **kwargs) == restored).all()
        assert ctx.sync.version == result["out"].version == 8  # 4 epochs x 2 inner epochs
    finally:
        ctx.close()


def test_the_disaggregated_soar_stage_survives_a_killed_rollout_worker(ray_local, tmp_path, capsys):
    job = _job(tmp_path, "stages.0.mode=disaggregated", "stages.0.max_staleness=1",
               "stages.0.num_steps=8", "checkpoint.every=1000")  # fmt: skip
    thread, result = _start(job, tmp_path)
    _kill_after(tmp_path, 3)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in result, result
    assert _steps(tmp_path) == list(range(1, 9))
    assert "rollout-0 was lost during RolloutWorker." in capsys.readouterr().out


def test_a_worker_exception_stops_and_retries_run_out_naming_the_worker(ray_local, tmp_path,
                                                                        capsys):  # fmt: skip
    from soar_ray.cluster.groups import RolloutPool
    from soar_ray.cluster.placement import create_topology
    from soar_ray.errors import RunStopped
    from soar_ray.workers.grpo import SampleRequest
    from soar_ray.workers.rollout import RolloutWorker

    job = _job(tmp_path, "cluster.max_task_retries=0")
    topology = create_topology(job.cluster)
    pool = RolloutPool(job, topology)
    try:
        # The worker's own error (no stage set yet) stops at once: nothing is retried.
        call = pool.submit(RolloutWorker.rollout, SampleRequest(["a red circle"], 0), num_returns=3)
        with pytest.raises(RuntimeError, match="set_stage must be called before rollout"):
            pool.get(call)
        assert "was lost" not in capsys.readouterr().out

        # A worker lost with no retry left: one line naming it.
        def die(worker):
            os._exit(1)

        with pytest.raises(RunStopped, match=r"rollout-0 was lost during test_a_worker_exception"
                           r".*die \(Actor(Died|Unavailable)Error\).*cluster\.max_task_retries = 0 times"):  # fmt: skip
            pool.get(pool.submit(die))
    finally:
        pool.kill()
        topology.remove()


# ---- a full disk during a checkpoint ---------------------------------------------------------------


def test_a_full_disk_mid_checkpoint_stops_and_the_next_run_resumes_from_the_last(ray_local,
                                                                                 tmp_path, capsys,
                                                                                 monkeypatch):  # fmt: skip
    import errno

    from soar_ray import checkpoint
    from soar_ray.errors import RunStopped

    job = _job(tmp_path, "stages.0.num_steps=4", "checkpoint.every=2",
               "cluster.num_rollout_workers=0")  # fmt: skip
    seal = checkpoint.write_manifest

    def full_disk(staging):
        if "-0000004-" in staging.name:  # the second checkpoint: its files are in, the seal fails
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "manifest.json"))
        return seal(staging)

    monkeypatch.setattr(checkpoint, "write_manifest", full_disk)
    with pytest.raises(RunStopped, match=r"checkpoint of stage \S+ step 4 could not be written "
                       r"\(\[Errno 28\] No space left on device.*checkpoint\.resume: auto"):  # fmt: skip
        run_pipeline(job, tmp_path)
    root = tmp_path / "checkpoints"
    [debris] = root.glob(".staging-step-00-0000004-*")
    assert [folder.name for _, folder in checkpoint.CheckpointManager(root, 3).complete()] == [
        "step-00-0000002"]  # fmt: skip
    monkeypatch.setattr(checkpoint, "write_manifest", seal)  # space freed
    run_pipeline(job, tmp_path)
    out = capsys.readouterr().out
    assert f"removed {debris}, a checkpoint an earlier run did not finish writing" in out
    assert re.search(r"resumed from \S+step-00-0000002 \(stage \S+, step 2\)", out)
    assert not debris.exists() and (root / "step-00-0000004").is_dir()
    assert _steps(tmp_path) == [1, 2, 3, 4]
