"""The Ray connection of `soar-ray run`: the cluster in `cluster.address` or RAY_ADDRESS, or an
embedded local Ray started for this one run.

Token authentication (Ray 2.60): a local `ray.init()` cluster turns it on by itself and makes a
token (~/.ray/auth_token unless RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH give one); a `ray start` head
turns it on when a token exists. A client of such a cluster (this process, `ray job submit`) must
export RAY_AUTH_MODE=token and the same token. A Ray job's entrypoint inherits both from the head.
Ray writes a new token file with the process umask (often world-readable); `start_local` makes
one it wrote readable by this user only (mode 0600).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import AuthenticationError

from soar_ray.config import ClusterConfig

TOKEN_HINT = (
    "if the cluster uses token authentication, export RAY_AUTH_MODE=token and the cluster's "
    "token as RAY_AUTH_TOKEN_PATH=<file> (or RAY_AUTH_TOKEN, or ~/.ray/auth_token); "
    "a wrong token fails the same way"
)
PROBE_TIMEOUT_S = 5.0
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"
"""Where Ray reads, and a local `ray.init()` writes, the token when no variable names one."""


class RayConnectionError(ConnectionError):
    """The Ray cluster cannot be reached or refused this client; the message says what to set."""


@dataclass(frozen=True)
class RaySession:
    """Where the run's Ray is and whether this process started it."""

    address: str
    """GCS address (host:port) of the cluster."""
    started_here: bool
    """True when `ray_session` ran `ray.init`, so it also shuts Ray down."""
    metrics_url: str
    """Prometheus endpoint of this node's metrics agent, where the `soar_ray_` gauges appear."""
    dashboard_url: str | None = None
    """Ray dashboard, when the cluster runs one and this process learnt where."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def describe_ray(*, started_here: bool, dashboard_url: str | None = None) -> RaySession:
    """The Ray this process is connected to, and the metrics endpoint of its node."""
    runtime = ray.get_runtime_context()
    node_id = runtime.get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    if dashboard_url and "://" not in dashboard_url:
        dashboard_url = f"http://{dashboard_url}"
    return RaySession(
        address=runtime.gcs_address,
        started_here=started_here,
        metrics_url=f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
        dashboard_url=dashboard_url or None,
    )


def resolve_address(cluster: ClusterConfig) -> tuple[str, str] | None:
    """The address to connect to and its source; `cluster.address` wins over RAY_ADDRESS."""
    if cluster.address:
        return cluster.address, "cluster.address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return None


def probe_address(address: str, source: str) -> None:
    """Fail in seconds on an unreachable host:port (ray.init retries for minutes)."""
    if "://" in address:
        raise RayConnectionError(
            f"{source}: {address!r} is a Ray Client address; use the cluster's GCS address "
            "(host:6379), or submit the run with `ray job submit`"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayConnectionError(f"{source}: {address!r} is not host:port (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise RayConnectionError(
            f"{source}: no Ray cluster answers at {address} ({exc}); start one with "
            f"`ray start --head`, or unset {source} to run on an embedded local Ray"
        ) from exc


def connect(address: str, source: str) -> RaySession:
    """Join an existing cluster as a driver (`auto`: the cluster `ray start` left on this host)."""
    if address != "auto":
        probe_address(address, source)
    try:
        context = ray.init(address=address)
    except AuthenticationError as exc:
        raise RayConnectionError(f"{source}: no usable token for Ray at {address}: {exc}") from exc
    except ConnectionError as exc:
        raise RayConnectionError(
            f"{source}: cannot join Ray at {address} ({exc}); {TOKEN_HINT}"
        ) from exc
    return describe_ray(started_here=True, dashboard_url=context.dashboard_url)


def start_local() -> RaySession:
    """An embedded single-node Ray with this machine's CPUs and GPUs, gone when the run ends;
    a token file Ray makes for it is set to mode 0600."""
    had_token = DEFAULT_TOKEN_PATH.exists()
    # "local" always starts a new instance; None would join a `ray start` cluster on this host.
    context = ray.init(address="local")
    if not had_token and DEFAULT_TOKEN_PATH.exists():
        # Whoever reads the token can run code on the cluster: this user only.
        DEFAULT_TOKEN_PATH.chmod(0o600)
    return describe_ray(started_here=True, dashboard_url=context.dashboard_url)


@contextmanager
def ray_session(cluster: ClusterConfig) -> Iterator[RaySession]:
    """Ray for one run: this process's Ray if it has one, else connect or start one; only what
    was started here is shut down."""
    if ray.is_initialized():
        yield describe_ray(started_here=False)
        return
    target = resolve_address(cluster)
    session = start_local() if target is None or target[0] == "local" else connect(*target)
    try:
        yield session
    finally:
        ray.shutdown()
