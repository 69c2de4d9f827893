"""The SOAR stage driver: data -> learner step -> metrics -> samples -> stage output (SPEC §1).

This driver runs one colocated learner in the driver's process. `lambda_aux: 0` runs plain
flow-matching SFT through the same loop.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from tqdm import tqdm

from soar_ray.build import build_dataset, build_sampler
from soar_ray.config import ConfigError, JobConfig, SoarStage
from soar_ray.data import LatentCacheDataset
from soar_ray.data.loader import iter_batches
from soar_ray.metrics import MetricsLogger, save_image_grid, to_uint8_images
from soar_ray.models import SD3Model, has_lora, merge_lora, save_transformer
from soar_ray.workers.learner import SoarLearner
from soar_ray.workers.rollout import generate_images


def check_in_process(job: JobConfig, stage_index: int) -> None:
    """Refuse topologies the in-process runner cannot provide, naming the field."""
    stage = job.stages[stage_index]
    if job.cluster.num_learners != 1:
        raise ConfigError(
            f"cluster.num_learners: {job.cluster.num_learners}; the in-process runner trains "
            "on one learner (set cluster.num_learners=1)"
        )
    if isinstance(stage, SoarStage) and stage.mode != "colocated":
        raise ConfigError(
            f"stages.{stage_index}.mode: {stage.mode!r}; the in-process runner is colocated"
        )


def save_samples(model: SD3Model, job: JobConfig, path: Path, logger: MetricsLogger,
                 step: int) -> Path:  # fmt: skip
    """A grid of the sample prompts rendered by the current weights (same noise every time)."""
    prompts = job.logging.sample_prompts[: job.logging.num_sample_prompts]
    pixels = generate_images(
        model, prompts, height=job.model.resolution, width=job.model.resolution,
        num_steps=job.logging.num_sample_steps, guidance=job.logging.sample_cfg_scale,
        seed=job.seed,
    )  # fmt: skip
    save_image_grid(to_uint8_images(pixels), path, captions=prompts)
    logger.log_image("samples", path, step)
    return path


def export_transformer(learner: SoarLearner, path: Path) -> Path:
    """The stage output: a diffusers transformer folder (EMA weights where enabled, LoRA merged)."""
    transformer = copy.deepcopy(learner.model.transformer)
    if learner.ema is not None:
        learner.ema.copy_to([p for p in transformer.parameters() if p.requires_grad])
    if has_lora(transformer):
        merge_lora(transformer)
    return save_transformer(transformer, path)


def run_soar_stage(job: JobConfig, stage_index: int, model: SD3Model, run_dir: Path) -> Path:
    """Train `job.stages[stage_index]` on `model`; returns the exported transformer folder."""
    check_in_process(job, stage_index)
    stage = job.stages[stage_index]
    stage_name = job.stage_names[stage_index]
    stage_dir = run_dir / stage_name
    dataset = build_dataset(job)
    sampler = build_sampler(job, dataset, rank=0, world_size=1)
    uncond = dataset.uncond_cond() if isinstance(dataset, LatentCacheDataset) else None
    learner = SoarLearner(model, stage, seed=job.seed, uncond=uncond)
    batches = iter_batches(dataset, sampler, first_step=0, num_steps=stage.num_steps,
                           num_workers=job.data.num_workers)  # fmt: skip
    sample_every = job.logging.sample_every
    samples_dir = run_dir / "samples"
    with MetricsLogger(run_dir, jsonl=job.logging.jsonl,
                       tensorboard=job.logging.tensorboard) as logger:  # fmt: skip
        if sample_every:
            save_samples(model, job, samples_dir / f"{stage_name}-step-000000.png", logger, 0)
        bar = tqdm(total=stage.num_steps, desc=stage_name, unit="step",
                   disable=not job.logging.progress_bar)  # fmt: skip
        for step, batch in enumerate(batches, start=1):
            start = time.perf_counter()
            metrics = learner.train_step(batch)
            metrics["samples_per_s"] = len(batch["caption"]) / (time.perf_counter() - start)
            metrics.update(stage=stage_name, epoch=batch["epoch"])
            if step % job.logging.every == 0 or step == stage.num_steps:
                logger.log(step, metrics)
            bar.update()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.1f}")
            if sample_every and (step % sample_every == 0 or step == stage.num_steps):
                path = samples_dir / f"{stage_name}-step-{step:06d}.png"
                save_samples(model, job, path, logger, step)
        bar.close()
    return export_transformer(learner, stage_dir / "transformer")
