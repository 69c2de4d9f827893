"""Thin Ray actors: each remote method is a few lines that call a plain class in workers/."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch

from soar_ray.algo.soar import SoarInputs
from soar_ray.build import (
    build_learner,
    build_sd3,
    cache_uncond,
    learner_components,
    learner_device,
)
from soar_ray.cluster.session import free_port
from soar_ray.config import JobConfig
from soar_ray.metrics import to_uint8_images
from soar_ray.workers.engine import init_distributed
from soar_ray.workers.learner import SoarLearner
from soar_ray.workers.rollout import RolloutWorker, generate_images


@ray.remote
class LearnerActor:
    """One data-parallel rank: a DeepSpeed engine around this rank's copy of the denoiser."""

    def __init__(self, job: JobConfig, rank: int, world_size: int) -> None:
        self.job, self.rank, self.world_size = job, rank, world_size
        self.learner: SoarLearner | None = None
        torch.manual_seed(job.seed)

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port for the process group (asked of rank 0)."""
        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        backend = "nccl" if self.job.cluster.gpus_per_learner > 0 else "gloo"
        init_distributed(self.rank, self.world_size, master_addr, master_port, backend=backend,
                         timeout_s=self.job.cluster.start_timeout_s)  # fmt: skip
        self.model = build_sd3(self.job, learner_device(self.job),
                               components=learner_components(self.job))  # fmt: skip

    def setup_stage(self, stage_index: int) -> None:
        self.learner = build_learner(self.job, stage_index, self.model, rank=self.rank,
                                     world_size=self.world_size)  # fmt: skip

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        return self.learner.train_step(batch)

    def train_on_inputs(self, inputs: SoarInputs) -> dict[str, float]:
        return self.learner.train_on_inputs(inputs)

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        return self.learner.export_weights()

    def save_checkpoint(self, folder: str) -> None:
        self.learner.save_checkpoint(folder)

    def load_checkpoint(self, folder: str) -> None:
        self.learner.load_checkpoint(folder)

    def save_transformer(self, path: str) -> str | None:
        saved = self.learner.save_transformer(path)
        return None if saved is None else str(saved)

    def generate_images(self, prompts: list[str], **kwargs: Any) -> np.ndarray:
        # Every rank renders inside the (ZeRO-3) gather, so partitioned weights are whole.
        with self.learner.gathered():
            return to_uint8_images(generate_images(self.model, prompts, **kwargs))


@ray.remote
class RolloutActor:
    """An inference copy of the denoiser: sample grids and disaggregated SOAR rollouts."""

    def __init__(self, job: JobConfig, index: int) -> None:
        device = "cuda" if job.cluster.gpus_per_learner > 0 and torch.cuda.is_available() else "cpu"
        self.job = job
        self.worker = RolloutWorker(build_sd3(job, device), seed=job.seed + 7919 * (index + 1),
                                    uncond=cache_uncond(job))  # fmt: skip

    def set_stage(self, stage_index: int) -> None:
        self.worker.set_stage(self.job.stages[stage_index], seed=self.job.seed)

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        self.worker.load_weights(weights, version)
        return version

    def prepare_soar(self, batch: dict[str, Any]) -> tuple[SoarInputs, int]:
        return self.worker.prepare_soar(batch)

    def generate_images(self, prompts: list[str], **kwargs: Any) -> np.ndarray:
        return to_uint8_images(generate_images(self.worker.model, prompts, **kwargs))
