"""Runs a job's stages in order on one Ray topology (SPEC §4)."""

from __future__ import annotations

from pathlib import Path

from soar_ray.checkpoint import read_state, resolve_resume
from soar_ray.config import ConfigError, JobConfig
from soar_ray.stages.context import StageContext
from soar_ray.stages.soar import run_soar_stage


def check_pipeline(job: JobConfig) -> None:
    """Refuse, before any actor starts, a job this release cannot execute."""
    for index, stage in enumerate(job.stages):
        if stage.algorithm != "soar":
            raise ConfigError(
                f"stages.{index}.algorithm: {stage.algorithm!r} is not runnable yet; "
                "this release runs soar stages (lambda_aux 0 for SFT)"
            )
    if len(job.stages) > 1:
        raise ConfigError(
            f"stages: {len(job.stages)} stages; chaining stages on one topology is not "
            "runnable yet, run one stage per job"
        )


def run_pipeline(job: JobConfig, run_dir: Path) -> list[Path]:
    """Every stage's exported transformer folder, in stage order."""
    check_pipeline(job)
    ctx = StageContext(job, run_dir)
    try:
        resume = resolve_resume(job.checkpoint.resume, ctx.checkpoints)
        resume_stage = read_state(resume).stage_index if resume is not None else 0
        outputs = []
        for index in range(len(job.stages)):
            if index < resume_stage:
                outputs.append(run_dir / job.stage_names[index] / "transformer")
                continue
            outputs.append(run_soar_stage(ctx, index, resume if index == resume_stage else None))
        return outputs
    finally:
        ctx.close()
