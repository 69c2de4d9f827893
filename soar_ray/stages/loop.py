"""The schedule every stage driver shares: resume, the progress bar, and after each iteration
(a SOAR step, a GRPO epoch) the checkpoint, the metrics record and the sample grid at their
configured intervals."""

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
"""Metrics a step must keep finite: a NaN or inf stops the run before its state is saved."""


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

    def due(self, every: int) -> bool:
        """Whether something scheduled `every` iterations (0: never) runs after this one."""
        return every > 0 and (self.step % every == 0 or self.step == self.total)

    def end(self, metrics: dict[str, Any], postfix: dict[str, str],
            render: Callable[[], Path] | None = None) -> None:  # fmt: skip
        """Progress bar, then checkpoint, metrics record and sample grid where they are due."""
        job = self.ctx.job
        metrics["policy_version"] = self.version
        self._check_finite(metrics)
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

    def _check_finite(self, metrics: dict[str, Any]) -> None:
        """Stop at a non-finite loss or gradient norm, before a checkpoint can keep the state
        (so no checkpoint of a diverged model rotates the good ones out); the step's record is
        logged first."""
        bad = {key: metrics[key] for key in FINITE_METRICS
               if key in metrics and not math.isfinite(metrics[key])}  # fmt: skip
        if not bad:
            return
        self.ctx.log(self.name, self.step, metrics)
        latest = self.ctx.checkpoints.latest()
        values = ", ".join(f"{key} {value}" for key, value in bad.items())
        raise NonFiniteError(
            f"stage {self.name} step {self.step}: {values}; the run stops without saving this "
            f"state. The last checkpoint is {latest or 'none'}: lower optimizer.lr (or "
            "optimizer.grad_clip) and run again, checkpoint.resume: auto continues from it"
        )

    def close(self) -> StageResult:
        """The stage output folder and final version."""
        self.bar.close()
        return StageResult(self.ctx.save_output(self.stage_index), self.version)


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (job seed, stage, epoch, call)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
