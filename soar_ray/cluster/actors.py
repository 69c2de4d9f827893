"""Thin Ray actors around the plain workers: a learner rank and a rollout worker.

Each actor builds its worker and then offers ONE generic, typed entry: `call(method, ...)` runs
`method(worker, ...)` for a method of the worker class (`Learner.train`, `RolloutWorker.rollout`,
...). The driver passes the function object itself, never its name, so a call is checked like
any other Python reference and no method is forwarded by hand through the layers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import ray
import torch

from soar_ray.build import (
    build_learner,
    build_sd3,
    cache_uncond,
    learner_components,
    learner_device,
)
from soar_ray.config import JobConfig
from soar_ray.errors import WeightGroupBroken, WorkerRestarted
from soar_ray.workers.engine import init_distributed
from soar_ray.workers.learner import Learner
from soar_ray.workers.rollout import RolloutWorker

R = TypeVar("R")
Step = tuple[Callable[..., Any], tuple]
"""`(method, args)`: `method(worker, *args)` for a method of the worker class."""


@ray.remote
class LearnerActor:
    """One data-parallel rank: joins the process group, then holds a `Learner`."""

    def __init__(self, job: JobConfig, rank: int, world_size: int) -> None:
        self.job, self.rank, self.world_size = job, rank, world_size
        self.learner: Learner | None = None
        self.rendezvous: socket.socket | None = None
        torch.manual_seed(job.seed)

    def node(self) -> tuple[str, str, int]:
        """(Ray node id, node address, process id) of this learner."""
        return (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(),
                os.getpid())  # fmt: skip

    def listen(self, host: str) -> int:
        """Bind and listen on a free port of `host` for the process group's rendezvous store
        (rank 0); the socket is held until `init_process_group` serves the store on it."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.rendezvous = socket.create_server((host, 0), family=family)
        return self.rendezvous.getsockname()[1]

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join the group and build the learner; with `deepspeed.enabled: false` the one
        learner trains in plain torch and there is no group to join."""
        job = self.job
        if job.deepspeed.enabled:
            backend = "nccl" if job.cluster.gpus_per_learner > 0 else "gloo"
            # The store takes over the socket's file descriptor.
            listen_fd = self.rendezvous.detach() if self.rendezvous is not None else None
            init_distributed(self.rank, self.world_size, master_addr, master_port,
                             listen_fd=listen_fd, backend=backend,
                             timeout_s=job.cluster.start_timeout_s)  # fmt: skip
        elif self.rendezvous is not None:
            self.rendezvous.close()
        model = build_sd3(job, learner_device(job), components=learner_components(job))
        self.learner = build_learner(job, model, rank=self.rank, world_size=self.world_size,
                                     distributed=job.deepspeed.enabled)  # fmt: skip

    def call(self, method: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """`method(learner, *args, **kwargs)` for a method of `Learner`."""
        return method(self.learner, *args, **kwargs)


@ray.remote
class RolloutActor:
    """An inference copy of the denoiser: holds a `RolloutWorker`."""

    def __init__(self, job: JobConfig, index: int) -> None:
        self.job, self.index = job, index
        self.worker = self._build()
        # Restarted by Ray (`max_restarts`), the worker holds `model.pretrained`: it takes no work
        # until the driver has restored the stage and weights the other workers hold.
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    def _build(self) -> RolloutWorker:
        job = self.job
        device = "cuda" if job.cluster.gpus_per_learner > 0 and torch.cuda.is_available() else "cpu"
        return RolloutWorker(job, build_sd3(job, device), seed=job.seed + 7919 * (self.index + 1),
                             uncond=cache_uncond(job), index=self.index)  # fmt: skip

    def call(self, method: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """`method(worker, *args, **kwargs)` for a method of `RolloutWorker`."""
        if self.restarted:
            raise WorkerRestarted(f"restarted rollout worker (pid {os.getpid()}) not restored yet")
        try:
            return method(self.worker, *args, **kwargs)
        except WeightGroupBroken as exc:
            # A push broke part-way (a member was lost): its weights are half written. The worker
            # leaves the group (members waiting on it fail too) and is built afresh by the
            # restore, as after a restart.
            self.worker.leave_weight_group()
            self.worker, self.restarted = None, True
            raise WorkerRestarted(f"rollout worker (pid {os.getpid()}): {exc}") from exc

    def restore(self, steps: list[Step]) -> bool:
        """After a restart, run `steps` (what gives the worker the pool's current stage and
        weights; object refs among their arguments are fetched), then take work again; a worker
        that was not restarted ignores them. Returns whether it restored."""
        if not self.restarted:
            return False
        if self.worker is None:
            self.worker = self._build()
        for method, args in steps:
            method(self.worker, *[ray.get(a) if isinstance(a, ray.ObjectRef) else a
                                  for a in args])  # fmt: skip
        self.restarted = False
        return True

    def pid(self) -> int:
        """The actor's process id; it changes when Ray restarts the actor."""
        return os.getpid()

    def node(self) -> tuple[str, str]:
        """(Ray node id, node address) of this worker; it may change when Ray restarts it."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
