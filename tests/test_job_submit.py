"""`soar-ray run` on a Ray cluster: where it connects, and a real `ray job submit` of the tiny job
to a `ray start` head on 127.0.0.1 with token auth, its logs and its dashboard metrics."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from soar_ray.cluster.session import (
    RayConnectionError,
    RaySession,
    connect,
    free_port,
    ray_session,
    resolve_address,
)
from soar_ray.config import ClusterConfig

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_STEPS = 12
# A colocated stage has no staleness; test_ray_metrics.py covers that gauge.
REQUIRED_METRICS = {
    "soar_ray_step", "soar_ray_loss", "soar_ray_loss_aux", "soar_ray_samples_per_second",
    "soar_ray_policy_version", "soar_ray_checkpoint_seconds",
}  # fmt: skip


def test_config_address_wins_over_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert resolve_address(ClusterConfig(address="10.0.0.1:6379")) == (
        "10.0.0.1:6379", "cluster.address"
    )  # fmt: skip
    assert resolve_address(ClusterConfig()) == ("10.0.0.2:6379", "RAY_ADDRESS")
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_address(ClusterConfig()) is None


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:{port}", "no Ray cluster answers at 127.0.0.1:"),
        ("ray://127.0.0.1:10001", "is a Ray Client address"),
        ("headnode", "is not host:port"),
    ],
)
def test_unusable_address_fails_fast_naming_its_source(address, message):
    start = time.monotonic()
    with pytest.raises(RayConnectionError, match=f"^RAY_ADDRESS: .*{message}"):
        connect(address.format(port=free_port()), "RAY_ADDRESS")
    assert time.monotonic() - start < 10  # ray.init would retry for minutes


def test_session_reuses_the_ray_of_this_process(ray_local):
    # Nothing listens there: joining it would fail, so the session must reuse this process's Ray.
    with ray_session(ClusterConfig(address=f"127.0.0.1:{free_port()}")) as session:
        assert session == RaySession(ray_local.address, False, ray_local.metrics_url)
    assert ray.is_initialized()  # not shut down: this process started it elsewhere


@dataclass(frozen=True)
class Head:
    """A `ray start --head` on 127.0.0.1 and the environment its clients need."""

    dashboard_url: str
    gcs_address: str
    metrics_url: str
    token: str
    env: dict[str, str]


def head_env(token_path: Path) -> dict[str, str]:
    """Environment of the head and its clients: token auth with this file, loopback only."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        # The job's entrypoint runs with the head's environment: `soar-ray` must be on its PATH.
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # see conftest.py
        RAY_metrics_report_interval_ms="1000",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM
    )
    return env


def _http_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_for_dashboard(url: str, token: str, head: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert head.poll() is None, "ray start --head exited; see head.log in its temp folder"
        try:
            _http_json(f"{url}/api/version", token)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _stop(head: subprocess.Popen) -> None:
    """Stop this head only (`ray stop` would kill every Ray on the machine)."""
    head.terminate()  # `ray start --block` kills its node's processes on SIGTERM
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    # A short folder of its own: Ray's unix socket paths under it must stay below 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="soar-ray-head-"))
    token = secrets.token_hex(32)  # the format `ray get-auth-token --generate` writes
    (root / "auth_token").write_text(token)
    env = head_env(root / "auth_token")
    gcs, dashboard, metrics, client, agent = (free_port() for _ in range(5))
    command = [
        BIN / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", "--num-cpus=4", f"--temp-dir={root / 'ray'}",
        "--disable-usage-stats",
    ]  # fmt: skip
    with open(root / "head.log", "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(url, token, head, timeout_s=120)
        yield Head(url, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{metrics}/metrics", token, env)
    finally:
        _stop(head)
        # Exiting workers may still write a log line; a leftover temp folder is harmless.
        shutil.rmtree(root, ignore_errors=True)


def _job_status(head: Head, job_id: str) -> str:
    return _http_json(f"{head.dashboard_url}/api/jobs/{job_id}", head.token)["status"]


def _soar_ray(head: Head, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`soar-ray ...` from the repository root with the head's address and token."""
    env = {**head.env, "RAY_API_SERVER_ADDRESS": head.dashboard_url}
    return subprocess.run([BIN / "soar-ray", *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)  # fmt: skip


def _ray_cli(head: Head, *args: str, timeout_s: float = 120) -> str:
    done = subprocess.run([BIN / "ray", *args], env=head.env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_submitted_tiny_job_succeeds_with_logs_and_metrics(ray_head, soar_metrics, tmp_path):
    run_dir = tmp_path / "run"
    job_id = f"soar-ray-test-{secrets.token_hex(4)}"
    overrides = [
        # One learner and no rollout worker: this test is about submission, logs and metrics.
        f"stages.0.num_steps={NUM_STEPS}", f"output_dir={run_dir}", "cluster.num_learners=1",
        "cluster.num_rollout_workers=0",
        f"checkpoint.every={NUM_STEPS // 2}", "logging.sample_every=0",
        "logging.tensorboard=false", "data.synthetic.num_images=32",
    ]  # fmt: skip
    # `soar-ray submit --follow` streams the logs and exits with the job's outcome.
    env = {**ray_head.env, "RAY_API_SERVER_ADDRESS": ray_head.dashboard_url}
    follow = subprocess.Popen([BIN / "soar-ray", "submit", "jobs/tiny.yaml", "--follow",
                               f"--submission-id={job_id}", *[f"--set={o}" for o in overrides]],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    # Gauges leave the endpoint soon after the driver exits, so read them while it runs.
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 300
    while follow.poll() is None:
        assert time.monotonic() < deadline, f"job {job_id} still {_job_status(ray_head, job_id)}"
        try:
            gauges = soar_metrics(ray_head.metrics_url)
        except urllib.error.URLError as exc:  # the head's metrics agent may not listen yet
            if not isinstance(exc.reason, ConnectionRefusedError):
                raise
            gauges = {}
        seen |= {name: value for (name, job, _stage), value in gauges.items() if job == "tiny"}
        time.sleep(0.5)
    logs, errors = follow.communicate()
    assert follow.returncode == 0, logs[-3000:] + errors
    assert f"soar-ray: submitted {job_id} ('tiny', run folder {run_dir})" in logs
    assert f"{ray_head.dashboard_url}/#/jobs/{job_id}" in logs
    assert logs.rstrip().endswith(f"soar-ray: job {job_id} SUCCEEDED")
    assert _job_status(ray_head, job_id) == "SUCCEEDED"
    assert f"soar-ray: Ray at {ray_head.gcs_address}" in logs  # joined the head, no local Ray
    assert f"{NUM_STEPS}/{NUM_STEPS}" in logs and "loss=" in logs  # the progress bar
    assert f"soar-ray: stage 0-soar -> {run_dir / '0-soar' / 'transformer'}" in logs
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == NUM_STEPS
    assert seen.keys() >= REQUIRED_METRICS, sorted(seen)
    assert 1 <= seen["soar_ray_step"] <= NUM_STEPS


@pytest.mark.slow
def test_submit_checks_the_job_first_and_follows_a_failure_to_its_outcome(ray_head, tmp_path):
    # Bad input never reaches the cluster: one line, exit 2, nothing submitted.
    jobs_before = _http_json(f"{ray_head.dashboard_url}/api/jobs/", ray_head.token)
    relative = _soar_ray(ray_head, "submit", "jobs/tiny.yaml")
    assert relative.returncode == 2 and "Traceback" not in relative.stderr
    assert relative.stderr.startswith("soar-ray: error: output_dir: 'runs/{name}' is relative")
    unknown = _soar_ray(ray_head, "submit", "jobs/tiny.yaml", f"--set=output_dir={tmp_path}",
                        "--set=stages.0.lr=3")  # fmt: skip
    assert unknown.returncode == 2 and "stages.0.lr: unknown key" in unknown.stderr
    assert _http_json(f"{ray_head.dashboard_url}/api/jobs/", ray_head.token) == jobs_before
    fast = [f"--set=output_dir={tmp_path / 'big'}", "--set=data.synthetic.num_images=8"]
    # A topology larger than the cluster passes the local checks and fails on the cluster (the
    # driver there checks it before any actor): submit says so and exits 1.
    failed = _soar_ray(ray_head, "submit", "jobs/tiny.yaml", "--follow", *fast,
                       "--set=cluster.num_learners=64")  # fmt: skip
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "cluster.num_learners" in failed.stdout and failed.stdout.rstrip().endswith("FAILED")
