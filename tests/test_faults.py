"""Faults injected into real runs of the tiny job on the session's Ray (two ZeRO-2 learners on
gloo): a learner stopped with SIGSTOP is reported stalled, by name, within its deadline, and the
run stops saying where `resume: auto` continues; a learner killed with SIGKILL under
`cluster.max_job_restarts` makes the run restart from its last checkpoint and finish, with one
metrics row per step."""

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
    """The pid of learner `rank`, once the run has logged `step`."""
    deadline = time.monotonic() + timeout_s
    while max(_steps(run_dir), default=0) < step:
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.1)
    return ray.get(ray.get_actor(f"learner-{rank}").node.remote(), timeout=60)[2]


def test_a_stopped_learner_is_named_stalled_and_the_run_says_where_to_resume(ray_local, tmp_path):
    job = _job(tmp_path, "stages.0.num_steps=200", "checkpoint.every=4",
               "cluster.stall_timeout_s=5")  # fmt: skip
    thread, result = _start(job, tmp_path)
    pid = _learner_pid_after_step(tmp_path, 1, 6)
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
