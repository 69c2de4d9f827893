"""What the stages of one job share: the Ray topology (learners, rollout workers, weight sync),
the data, the checkpoints and the metrics. Stage drivers call these few methods; they hold no
distributed state of their own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from soar_ray.build import build_dataset, build_sampler
from soar_ray.checkpoint import CheckpointManager, CheckpointState, read_state
from soar_ray.cluster.groups import LearnerGroup, RolloutPool
from soar_ray.cluster.placement import Topology, create_topology
from soar_ray.cluster.weights import ObjectStoreWeightSync
from soar_ray.config import JobConfig, dump_config
from soar_ray.data.loader import iter_batches
from soar_ray.metrics import MetricsLogger, save_image_grid

LEARNERS_DIR = "learners"


class StageContext:
    """The job's actors and services, created once and kept across stages."""

    def __init__(self, job: JobConfig, run_dir: Path) -> None:
        self.job, self.run_dir = job, run_dir
        self.logger: MetricsLogger | None = None
        self.learners: LearnerGroup | None = None
        self.rollouts: RolloutPool | None = None
        # The placement group first: a topology the cluster cannot hold fails before anything.
        self.topology: Topology = create_topology(job.cluster)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        job = self.job
        self.dataset = build_dataset(job)
        world = job.cluster.num_learners
        self.samplers = [build_sampler(job, self.dataset, rank, world) for rank in range(world)]
        self.global_batch_size = job.data.batch_size * world
        self.checkpoints = CheckpointManager(job.checkpoint_path, job.checkpoint.keep_last)
        self.logger = MetricsLogger(
            self.run_dir, jsonl=job.logging.jsonl, tensorboard=job.logging.tensorboard,
            ray_metrics=job.logging.ray_metrics, job_name=job.name,
        )  # fmt: skip
        self.learners = LearnerGroup(job, self.topology)
        self.rollouts = RolloutPool(job, self.topology) if job.cluster.num_rollout_workers else None
        self.sync = ObjectStoreWeightSync(self.learners, self.rollouts) if self.rollouts else None

    def close(self) -> None:
        """Stop the actors and release the placement group (whatever of them was started)."""
        if self.logger is not None:
            self.logger.close()
        for group in (self.rollouts, self.learners):
            if group is not None:
                group.kill()
        self.topology.remove()

    def setup_stage(self, stage_index: int) -> None:
        self.learners.setup_stage(stage_index)
        if self.rollouts is not None:
            self.rollouts.set_stage(stage_index)

    def batches(self, *, first_step: int, num_steps: int) -> Iterator[list[dict[str, Any]]]:
        """Per-rank batches of the given steps (step-indexed, so resume continues exactly)."""
        return iter_batches(self.dataset, self.samplers, first_step=first_step,
                            num_steps=num_steps, num_workers=self.job.data.num_workers)  # fmt: skip

    def restore(self, folder: Path) -> int:
        """Load a checkpoint into the learners; returns its step."""
        state = read_state(folder)
        self.learners.load_checkpoint(folder / LEARNERS_DIR)
        print(f"soar-ray: resumed from {folder} (stage {state.stage_name}, step {state.step})")
        return state.step

    def save_checkpoint(self, stage_index: int, step: int, version: int) -> float:
        """An atomic checkpoint of (stage, step); returns the seconds it took."""
        start = time.perf_counter()
        staging = self.checkpoints.begin(stage_index, step)
        self.learners.save_checkpoint(staging / LEARNERS_DIR)
        self.learners.save_transformer(staging / "transformer")
        (staging / "config.yaml").write_text(dump_config(self.job))
        name = self.job.stage_names[stage_index]
        self.checkpoints.commit(staging, CheckpointState(stage_index, name, step, version))
        return time.perf_counter() - start

    def log(self, stage_name: str, step: int, metrics: dict[str, Any]) -> None:
        self.logger.log(step, {"stage": stage_name, **metrics})

    def render_samples(self, stage_name: str, step: int, version: int = 0) -> Path:
        """A grid of the sample prompts with the current weights (the same noise every time)."""
        cfg = self.job.logging
        prompts = cfg.sample_prompts[: cfg.num_sample_prompts]
        kwargs = {
            "height": self.job.model.resolution, "width": self.job.model.resolution,
            "num_steps": cfg.num_sample_steps, "guidance": cfg.sample_cfg_scale,
            "seed": self.job.seed,
        }  # fmt: skip
        if self.rollouts is not None:
            self.sync.push(version)
            self.sync.wait()
            images = self.rollouts.generate_images(prompts, **kwargs)
        else:
            images = self.learners.generate_images(prompts, **kwargs)
        path = self.run_dir / "samples" / f"{stage_name}-step-{step:06d}.png"
        save_image_grid(images, path, captions=prompts)
        self.logger.log_image("samples", path, step)
        return path
