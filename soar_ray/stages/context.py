"""What the stages of one job share: the Ray topology (learners, rollout workers, reward pool,
weight sync), the checkpoints and the metrics. They live for the whole job; stage drivers call
these few methods and the actor groups' generic calls, and hold no distributed state."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import RayTaskError

from soar_ray.checkpoint import CheckpointManager, CheckpointState, read_state
from soar_ray.cluster.actors import Step
from soar_ray.cluster.groups import LearnerGroup, RolloutPool
from soar_ray.cluster.placement import Topology, create_topology
from soar_ray.cluster.rewards import RewardPool
from soar_ray.cluster.weights import WeightSync, build_weight_sync
from soar_ray.config import ConfigError, JobConfig, dump_config
from soar_ray.data.prompts import load_text_prompts
from soar_ray.errors import RunStopped
from soar_ray.metrics import MetricsLogger, grid_file, save_image_grid
from soar_ray.workers.learner import Learner
from soar_ray.workers.rollout import RolloutWorker

LEARNERS_DIR = "learners"


def sample_prompts(job: JobConfig) -> list[str]:
    """The prompts of the fixed-noise sample grids: `logging.sample_prompts_file` when set (a
    bad line of it is a ConfigError naming the field, file and line)."""
    cfg = job.logging
    prompts = cfg.sample_prompts
    if cfg.sample_prompts_file is not None:
        try:
            prompts = [p.text for p in load_text_prompts(cfg.sample_prompts_file)]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"logging.sample_prompts_file: {exc}") from None
    return prompts[: cfg.num_sample_prompts]


class StageContext:
    """The job's actors and services, created once and kept across stages."""

    def __init__(self, job: JobConfig, run_dir: Path) -> None:
        self.job, self.run_dir = job, run_dir
        self.logger: MetricsLogger | None = None
        self.learners: LearnerGroup | None = None
        self.rollouts: RolloutPool | None = None
        self.rewards: RewardPool | None = None
        self.sync: WeightSync | None = None
        self._rollout_stage: tuple[int, ray.ObjectRef | None] | None = None
        # The placement group first: a topology the cluster cannot hold fails before anything.
        self.topology: Topology = create_topology(job.cluster, job.reward_names)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        job = self.job
        self.sample_prompts = sample_prompts(job)
        self.checkpoints = CheckpointManager(job.checkpoint_path, job.checkpoint.keep_last)
        self.logger = MetricsLogger(
            self.run_dir, jsonl=job.logging.jsonl, tensorboard=job.logging.tensorboard,
            ray_metrics=job.logging.ray_metrics, job_name=job.name,
        )  # fmt: skip
        self.learners = LearnerGroup(job, self.topology)
        if job.cluster.num_rollout_workers:
            self.rollouts = RolloutPool(job, self.topology)
            self.sync = build_weight_sync(job.cluster, self.learners, self.rollouts)
            self.rollouts.restore_steps = self.rollout_state
            self.rollouts.replaced = self.sync.replaced
        self.rewards = RewardPool.for_job(job, self.topology)

    def close(self) -> None:
        """Stop the actors and release the placement group (whatever of them was started)."""
        if self.logger is not None:
            self.logger.close()
        if self.rewards is not None:
            self.rewards.shutdown()
        for group in (self.rollouts, self.learners):
            if group is not None:
                group.kill()
        self.topology.remove()

    # ---- stage boundaries ----------------------------------------------------------------------

    def start_stage(self, stage_index: int, *, handoff: bool) -> None:
        """Fresh engines and steps for the stage; after an earlier stage (`handoff`) the rollout
        workers first receive the learners' full weights (SPEC §4)."""
        weights = None
        if handoff and self.rollouts is not None:
            weights = self.learners.first(Learner.export_weights)
        self.learners.call(Learner.setup_stage, stage_index)
        if self.rollouts is not None:
            # Kept (a full copy in the object store) while the stage runs: a restored worker
            # starts the stage from them.
            self._rollout_stage = (stage_index, weights)
            self.sync.forget()
            self.rollouts.call(RolloutWorker.set_stage, stage_index, weights)

    def rollout_state(self) -> list[Step]:
        """What a restarted rollout worker runs to hold what the others hold: the current stage
        (from its handoff weights) and the last pushed weights."""
        if self._rollout_stage is None:
            return []
        return [(RolloutWorker.set_stage, self._rollout_stage), *self.sync.restore_steps()]

    def finish_stage(self) -> None:
        """The stage output (EMA where enabled, LoRA merged) becomes the live weights."""
        self.learners.call(Learner.finish_stage)

    def load_stage_output(self, path: Path) -> None:
        """Resuming inside a later stage: the learners start from an earlier stage's output."""
        self.learners.call(Learner.load_transformer, str(path))

    # ---- checkpoints, metrics, pictures ------------------------------------------------------------

    def restore(self, folder: Path) -> CheckpointState:
        """Load a checkpoint into the learners; returns its state."""
        state = read_state(folder)
        self.learners.call(Learner.load_checkpoint, str(folder / LEARNERS_DIR))
        print(f"soar-ray: resumed from {folder} (stage {state.stage_name}, step {state.step})")
        return state

    def save_checkpoint(self, stage_index: int, step: int, version: int) -> float:
        """An atomic checkpoint of (stage, step); returns the seconds it took."""
        start = time.perf_counter()
        staging = self.checkpoints.begin(stage_index, step)
        name = self.job.stage_names[stage_index]
        try:
            self.learners.call(Learner.save_checkpoint, str(staging / LEARNERS_DIR))
            self.learners.call(Learner.save_transformer, str(staging / "transformer"))
            (staging / "config.yaml").write_text(dump_config(self.job))
            self.checkpoints.commit(staging, CheckpointState(stage_index, name, step, version))
        except OSError as exc:  # a full disk, here or on a learner (whose RayTaskError is one)
            cause = exc.cause if isinstance(exc, RayTaskError) else exc
            raise RunStopped(
                f"the checkpoint of stage {name} step {step} could not be written ({cause}); "
                f"nothing of it is resumed from: free space under {self.checkpoints.root}, then "
                "run again with checkpoint.resume: auto, which removes the unfinished folder and "
                "continues from the last complete checkpoint"
            ) from exc
        return time.perf_counter() - start

    def save_output(self, stage_index: int) -> Path:
        """The stage output: a diffusers transformer folder (and a LoRA stage's adapter)."""
        path = self.run_dir / self.job.stage_names[stage_index] / "transformer"
        return Path(self.learners.call(Learner.save_transformer, str(path))[0])

    def log(self, stage_name: str, step: int, metrics: dict) -> None:
        self.logger.log(step, {"stage": stage_name, **metrics})

    def save_grid(self, images: np.ndarray, captions: list[str], name: str, step: int) -> Path:
        """A captioned PNG grid under samples/, also shown in TensorBoard."""
        path = self.run_dir / "samples" / grid_file(name, step)
        save_image_grid(images, path, captions=captions)
        self.logger.log_image(name, path, step)
        return path

    def render_samples(self, stage_name: str, step: int, version: int = 0) -> Path:
        """A grid of the sample prompts with the current weights (the same noise every time)."""
        cfg = self.job.logging
        kwargs = {
            "height": self.job.model.resolution, "width": self.job.model.resolution,
            "num_steps": cfg.num_sample_steps, "guidance": cfg.sample_cfg_scale,
            "seeds": [self.job.seed + i for i in range(len(self.sample_prompts))],
        }  # fmt: skip
        if self.rollouts is not None:
            self.sync.push(version)
            self.sync.wait()
            call = self.rollouts.submit(
                RolloutWorker.generate_images, self.sample_prompts, **kwargs
            )
            images = self.rollouts.get(call)
        else:
            images = self.learners.call(Learner.generate_images, self.sample_prompts, **kwargs)[0]
        return self.save_grid(images, self.sample_prompts, f"{stage_name}-step", step)
