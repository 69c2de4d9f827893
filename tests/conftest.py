"""Shared fixtures: one embedded Ray on 127.0.0.1 for the whole session, and small CPU settings.

The environment is set before anything imports Ray, since Ray reads it at import and at start:
- on Linux Ray replaces 127.0.0.1 by the host's address unless this flag (named for Windows and
  macOS, where loopback-only is the default) is off, so every server here binds to loopback;
- token auth on with a per-session token, so no test reads or writes ~/.ray/auth_token;
- metrics exported every second, so a gauge reaches the metrics endpoint quickly;
- no usage-stats reporting, and no RAY_ADDRESS from the developer's shell.
"""

import os
import secrets
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.pop("RAY_ADDRESS", None)
os.environ.update(
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    RAY_AUTH_MODE="token",
    RAY_AUTH_TOKEN=secrets.token_hex(32),
    RAY_metrics_report_interval_ms="1000",
    RAY_USAGE_STATS_ENABLED="0",
)

import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from soar_ray.cluster.session import RaySession, describe_ray, free_port  # noqa: E402

# Two cores shared by the test process and the Ray workers: extra threads only contend.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[RaySession]:
    """One embedded Ray for the session: 4 logical CPUs, no dashboard, its own temp folder."""
    # A short folder: Ray's unix socket paths under it must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="soar-ray-"))
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,  # actor errors still arrive as exceptions with their traceback
        _temp_dir=str(temp_dir),
        _metrics_export_port=free_port(),
    )
    try:
        session = describe_ray(started_here=True)
        assert session.address.startswith("127.0.0.1:"), session
        yield session
    finally:
        ray.shutdown()
        # Exiting workers may still write a log line; a leftover temp folder is harmless.
        shutil.rmtree(temp_dir, ignore_errors=True)


def read_soar_metrics(url: str) -> dict[tuple[str, str, str], float]:
    """The `soar_ray_` gauges on a Prometheus endpoint, keyed by (name, job, stage)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # Ray puts its own `ray_` namespace in front of every custom metric.
            name = sample.name.removeprefix("ray_")
            if name.startswith("soar_ray_"):
                values[name, sample.labels.get("job"), sample.labels.get("stage")] = sample.value
    return values


@pytest.fixture
def soar_metrics() -> Callable[[str], dict[tuple[str, str, str], float]]:
    """`read_soar_metrics`, for tests that read a metrics endpoint."""
    return read_soar_metrics


class Planted:
    """Unpickling it calls os.mkdir(marker): a stand-in for any code a file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def plant_code(path: Path, marker: Path) -> None:
    """A torch file at `path` whose unsafe loading (weights_only=False) makes the folder `marker`."""
    torch.save({"state": Planted(marker)}, path)


@pytest.fixture
def plant() -> Callable[[Path, Path], None]:
    """`plant_code`, for tests that a checkpoint file cannot run code."""
    return plant_code
