"""Runs a job's stages in order on one Ray topology (SPEC §4), each by its registered driver.

Before any actor starts: the checkpoint to resume from is chosen and verified (checkpoint.py),
the job's settings are checked against it and metrics.jsonl goes back to it (resume.py).

A stage's driver is found by `stage.algorithm` in `STAGES`: `check` runs before any actor starts
(bad input is one clear line), `run` trains the stage on the shared `StageContext`. Between
stages the finished stage's output (EMA where enabled, LoRA merged) becomes the live weights, the
next stage gets fresh engines on them, the rollout workers receive them in full, and the policy
version keeps counting.

A learner that dies or stalls (`LearnerFailed`) ends the attempt: the actors go, and with
`cluster.max_job_restarts` left the run starts again from the last complete checkpoint
(`resume: auto`); otherwise it stops, naming the checkpoint `resume: auto` continues from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soar_ray.checkpoint import CheckpointManager, read_state, resolve_resume
from soar_ray.config import ConfigError, JobConfig
from soar_ray.errors import LearnerFailed
from soar_ray.stages.context import StageContext, sample_prompts
from soar_ray.stages.grpo import check_grpo_stage, run_grpo_stage
from soar_ray.stages.loop import StageResult, StageStart
from soar_ray.stages.resume import check_resume_settings, rewind_metrics
from soar_ray.stages.soar import check_soar_stage, run_soar_stage


@dataclass(frozen=True)
class StageDriver:
    """How a stage kind is checked and run."""

    check: Callable[[JobConfig, int], None]
    """Raises ConfigError (naming the field, file or line) for input the stage cannot use."""
    run: Callable[[StageContext, int, StageStart], StageResult]
    """Trains the stage on the job's actors."""


STAGES: dict[str, StageDriver] = {
    "soar": StageDriver(check_soar_stage, run_soar_stage),
    "grpo": StageDriver(check_grpo_stage, run_grpo_stage),
}
"""stage.algorithm -> its driver."""


def check_pipeline(job: JobConfig) -> None:
    """Every stage's own checks, before any actor starts."""
    for index, stage in enumerate(job.stages):
        if stage.algorithm not in STAGES:
            raise ConfigError(f"stages.{index}.algorithm: no driver for {stage.algorithm!r}")
        STAGES[stage.algorithm].check(job, index)


def check_job(job: JobConfig) -> None:
    """Every check of bad input that needs no Ray, each one line: the paths the job names, every
    stage's own checks, the sample prompts (`soar-ray run` and `submit`, before Ray)."""
    job.validate_paths()
    check_pipeline(job)
    sample_prompts(job)


def run_pipeline(job: JobConfig, run_dir: Path) -> list[Path]:
    """Every stage's exported transformer folder, in stage order; after a learner failure, up to
    `cluster.max_job_restarts` more attempts, each resuming from the last complete checkpoint."""
    check_pipeline(job)
    restarts = job.cluster.max_job_restarts
    for attempt in range(restarts + 1):
        try:
            return run_attempt(job, run_dir)
        except LearnerFailed as exc:
            point = resume_point(job)
            if attempt == restarts:
                raise LearnerFailed(
                    f"{exc}; checkpoint.resume: auto continues from {point}"
                ) from None
            print(f"soar-ray: {exc}; restarting from {point} (restart {attempt + 1} of {restarts})")
            job = job.model_copy(update={"checkpoint": job.checkpoint.model_copy(
                update={"resume": "auto"})})  # fmt: skip
    raise AssertionError("unreachable: the last attempt returns or raises")


def resume_point(job: JobConfig) -> str:
    """Where `resume: auto` would continue, in words (before verifying it)."""
    latest = CheckpointManager(job.checkpoint_path, job.checkpoint.keep_last).latest()
    state = read_state(latest) if latest is not None else None
    if state is None:
        return "the start (no checkpoint was written yet)"
    return f"stage {state.stage_name} step {state.step} ({latest})"


def run_attempt(job: JobConfig, run_dir: Path) -> list[Path]:
    """One attempt of the run: resume point, actors, every stage from there."""
    checkpoints = CheckpointManager(job.checkpoint_path, job.checkpoint.keep_last)
    # Debris of an interrupted checkpoint goes first: after a full disk it is what fills it.
    for folder in checkpoints.remove_staging():
        print(f"soar-ray: removed {folder}, a checkpoint an earlier run did not finish writing")
    resume = resolve_resume(job.checkpoint.resume, checkpoints)
    state = read_state(resume) if resume is not None else None
    if state is not None:
        check_resume_settings(job, resume, state)
    first = state.stage_index if state is not None else 0
    outputs = [run_dir / name / "transformer" for name in job.stage_names[:first]]
    if first > 0 and not (outputs[-1] / "config.json").is_file():
        raise FileNotFoundError(
            f"{outputs[-1]}: resuming {resume} inside stage {job.stage_names[first]!r} needs the "
            "output of the stage before it, written when that stage ended, and it is missing; "
            "resume from an earlier checkpoint (checkpoint.resume: <path>) or start over "
            "(checkpoint.resume: never)"
        )
    rewind_metrics(job, run_dir, state)
    ctx = StageContext(job, run_dir)
    try:
        if first > 0:
            ctx.load_stage_output(outputs[-1])
        version = 0  # a resumed stage takes its version from the checkpoint
        for index in range(first, len(job.stages)):
            if index > first:
                ctx.finish_stage()
            ctx.start_stage(index, handoff=index > 0)
            start = StageStart(resume if index == first else None, version)
            result = STAGES[job.stages[index].algorithm].run(ctx, index, start)
            outputs.append(result.output)
            version = result.version
        return outputs
    finally:
        ctx.close()
