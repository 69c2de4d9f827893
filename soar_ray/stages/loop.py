"""The schedule every stage driver shares: resume, the progress bar, and after each iteration
(a SOAR step, a GRPO epoch) the divergence check, then the checkpoint, the metrics record and the
sample grid at their configured intervals."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from soar_ray.errors import NonFiniteError
from soar_ray.stages.context import StageContext

FINITE_METRICS = ("loss", "policy_loss", "kl", "grad_norm")
"""Metrics a step must keep finite: a NaN or inf stops the run before its state is saved
(`optimizer.on_nonfinite: stop`)."""
MAX_SKIPPED_IN_A_ROW = 5
"""`on_nonfinite: skip_step` stops the run at this many skipped optimizer steps in a row: the
model has diverged rather than met one bad batch."""


@dataclass(frozen=True)
class StageStart:
    """Where a stage begins: a checkpoint of this stage to continue from, or none, and the
    job-wide policy version (optimizer updates of all earlier stages)."""

    resume: Path | None
    version: int


@dataclass(frozen=True)
class StageResult:
    """A finished stage: its output folder and the policy version it ended at."""

    output: Path
    version: int


class StageLoop:
    """Iterations 1..total of one stage; `end` runs the schedule after each."""

    def __init__(self, ctx: StageContext, stage_index: int, start: StageStart, *, total: int,
                 unit: str) -> None:  # fmt: skip
        job, stage = ctx.job, ctx.job.stages[stage_index]
        self.ctx, self.stage_index, self.total = ctx, stage_index, total
        self.name = job.stage_names[stage_index]
        self.checkpoint_every = stage.checkpoint_every or job.checkpoint.every
        self.on_nonfinite = stage.optimizer.on_nonfinite
        self.step, self.version = 0, start.version
        if start.resume is not None:
            state = ctx.restore(start.resume)
            self.step, self.version = state.step, state.policy_version
        self.resumed = start.resume is not None
        self.bar = tqdm(initial=self.step, total=total, desc=self.name, unit=unit,
                        disable=not job.logging.progress_bar)  # fmt: skip

    def __iter__(self) -> Iterator[int]:
        """The iterations still to run; `step` is the current one while the body runs."""
        while self.step < self.total:
            self.step += 1
            yield self.step

    def due(self, every: int, step: int | None = None) -> bool:
        """Whether something scheduled `every` iterations (0: never) runs after iteration `step`
        (default: the current one)."""
        step = self.step if step is None else step
        return every > 0 and (step % every == 0 or step == self.total)

    def holds_after(self, step: int) -> bool:
        """Whether the learners' state after iteration `step` is read before the next one runs:
        the stage ends, or a checkpoint or sample grid is due. Otherwise a driver may queue the
        next iteration's call while this one runs."""
        every = (self.checkpoint_every, self.ctx.job.logging.sample_every)
        return step >= self.total or any(self.due(n, step) for n in every)

    def end(self, metrics: dict[str, Any], postfix: dict[str, str],
            render: Callable[[], Path] | None = None) -> None:  # fmt: skip
        """Progress bar, then checkpoint, metrics record and sample grid where they are due."""
        job = self.ctx.job
        metrics["policy_version"] = self.version
        self._check_divergence(metrics)
        self.bar.update()
        self.bar.set_postfix(postfix)
        if self.due(self.checkpoint_every):
            metrics["checkpoint_seconds"] = self.ctx.save_checkpoint(
                self.stage_index, self.step, self.version
            )
        if self.due(job.logging.every):
            self.ctx.log(self.name, self.step, metrics)
        if render is not None and self.due(job.logging.sample_every):
            render()

    def _check_divergence(self, metrics: dict[str, Any]) -> None:
        """Stop at a non-finite loss or gradient norm (`stop`), or count the optimizer steps the
        learners skipped for one and stop at `MAX_SKIPPED_IN_A_ROW` in a row (`skip_step`).
        A stop comes before a checkpoint can keep the state (so no checkpoint of a diverged
        model rotates the good ones out); the step's record is logged first."""
        skipped = metrics.get("skipped_steps", 0)
        if self.on_nonfinite == "skip_step":
            # The learners applied no step with a non-finite loss or gradient: the state is good.
            if skipped:
                tqdm.write(f"soar-ray: stage {self.name} step {self.step}: skipped {skipped} "
                           "optimizer step(s) with a non-finite loss or gradient norm "
                           f"({metrics['skipped_steps_in_a_row']} in a row)")  # fmt: skip
            if metrics.get("skipped_steps_in_a_row", 0) < MAX_SKIPPED_IN_A_ROW:
                return
            what = f"{MAX_SKIPPED_IN_A_ROW} optimizer steps in a row were skipped"
            other = ""
        else:
            bad = {key: metrics[key] for key in FINITE_METRICS
                   if key in metrics and not math.isfinite(metrics[key])}  # fmt: skip
            if not bad and not skipped:
                return
            what = ", ".join(f"{key} {value}" for key, value in bad.items()) or (
                f"{skipped} optimizer step(s) skipped for a non-finite loss or gradient"
            )
            other = "; for one bad batch, resume with optimizer.on_nonfinite: skip_step instead"
        self.ctx.log(self.name, self.step, metrics)
        latest = self.ctx.checkpoints.latest()
        raise NonFiniteError(
            f"stage {self.name} step {self.step}: {what}; the run stops without saving this "
            f"state (last checkpoint: {latest or 'none'}). Lower optimizer.lr (or "
            "optimizer.grad_clip) and start over with checkpoint.resume: never, since a resume "
            f"keeps its checkpoint's optimizer settings{other}"
        )

    def close(self) -> StageResult:
        """The stage output folder and final version, once the stage's last weight push has
        reached the rollout workers (or its error is raised)."""
        self.bar.close()
        if self.ctx.sync is not None:
            self.ctx.sync.wait()
        return StageResult(self.ctx.save_output(self.stage_index), self.version)


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (job seed, stage, epoch, call)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
