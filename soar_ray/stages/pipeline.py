"""Runs a job's stages in order on one model: stage k+1 starts from stage k's weights (SPEC §4)."""

from __future__ import annotations

from pathlib import Path

from soar_ray.build import build_sd3
from soar_ray.config import ConfigError, JobConfig
from soar_ray.stages.soar import check_in_process, run_soar_stage


def check_pipeline(job: JobConfig) -> None:
    """Refuse, before any work starts, a stage this runner cannot execute."""
    for index, stage in enumerate(job.stages):
        if stage.algorithm != "soar":
            raise ConfigError(
                f"stages.{index}.algorithm: {stage.algorithm!r} is not runnable yet; "
                "this release runs soar stages (lambda_aux 0 for SFT)"
            )
        check_in_process(job, index)


def run_pipeline(job: JobConfig, run_dir: Path) -> list[Path]:
    """Every stage's exported transformer folder, in stage order."""
    check_pipeline(job)
    model = build_sd3(job)
    outputs = []
    for index in range(len(job.stages)):
        # The model object carries the trained weights into the next stage.
        outputs.append(run_soar_stage(job, index, model, run_dir))
    return outputs
