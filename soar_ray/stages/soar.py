"""The SOAR stage driver (SPEC §1): data -> shards -> (rollout) -> learners -> metrics ->
checkpoint -> samples, one loop read top to bottom.

`colocated`: every learner does its own no-grad CFG rollout (exactly the reference, on-policy).
`disaggregated`: rollout workers build the aux points with a policy at most `max_staleness`
versions old, while the learners train; every sample carries the version it was made with.
`lambda_aux: 0` runs plain flow-matching SFT through the same loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from soar_ray.stages.context import StageContext


class AuxPrefetcher:
    """Keeps the rollout workers `max_staleness` steps ahead of the learners."""

    def __init__(self, ctx: StageContext, batches: Iterator[list[dict[str, Any]]], depth: int):
        self.ctx, self.batches, self.depth = ctx, batches, depth
        self.queue: deque[list[list[ray.ObjectRef]]] = deque()

    def next(self) -> tuple[list[ray.ObjectRef], int]:
        """The next step's per-rank inputs (still refs) and the oldest version among them."""
        while len(self.queue) <= self.depth:
            batches = next(self.batches, None)
            if batches is None:
                break
            self.queue.append(self.ctx.rollouts.prepare_soar(batches))
        refs = self.queue.popleft()
        versions = ray.get([version for _, version in refs])
        return [inputs for inputs, _ in refs], min(versions)


def run_soar_stage(ctx: StageContext, stage_index: int, resume: Path | None) -> Path:
    """Train `job.stages[stage_index]` on the context's actors; returns the stage output folder."""
    job, stage, name = ctx.job, ctx.job.stages[stage_index], ctx.job.stage_names[stage_index]
    ctx.setup_stage(stage_index)
    step = ctx.restore(resume) if resume is not None else 0
    accumulation = stage.gradient_accumulation_steps
    checkpoint_every = stage.checkpoint_every or job.checkpoint.every
    version = step // accumulation  # the policy version: optimizer updates so far
    batches = ctx.batches(first_step=step, num_steps=stage.num_steps - step)
    disaggregated = stage.mode == "disaggregated"
    prefetch = AuxPrefetcher(ctx, batches, stage.max_staleness) if disaggregated else None
    if ctx.sync is not None:
        ctx.sync.push(version)
    if job.logging.sample_every and step == 0:
        ctx.render_samples(name, step)
    bar = tqdm(initial=step, total=stage.num_steps, desc=name, unit="step",
               disable=not job.logging.progress_bar)  # fmt: skip
    while step < stage.num_steps:
        start = time.perf_counter()
        if prefetch is not None:
            inputs, made_with = prefetch.next()
            metrics = ctx.learners.train_on_inputs(inputs)
            metrics["staleness"] = version - made_with
            assert metrics["staleness"] <= stage.max_staleness, metrics  # invariant of the queue
        else:
            metrics = ctx.learners.train_step(next(batches))
        step += 1
        if step % accumulation == 0:
            version += 1
            if disaggregated:
                ctx.sync.push(version)  # queued before the next prepare calls on every worker
        seconds = time.perf_counter() - start
        metrics.update(samples_per_s=ctx.global_batch_size / seconds, policy_version=version)
        bar.update()
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.1f}")
        if step % checkpoint_every == 0 or step == stage.num_steps:
            metrics["checkpoint_seconds"] = ctx.save_checkpoint(stage_index, step, version)
        if step % job.logging.every == 0 or step == stage.num_steps:
            ctx.log(name, step, metrics)
        if job.logging.sample_every and (step % job.logging.sample_every == 0
                                         or step == stage.num_steps):  # fmt: skip
            ctx.render_samples(name, step, version)
    bar.close()
    return ctx.learners.save_transformer(ctx.run_dir / name / "transformer")
