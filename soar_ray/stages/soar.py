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

from soar_ray.build import build_dataset, build_sampler, data_errors
from soar_ray.cluster.groups import RolloutCall
from soar_ray.config import JobConfig
from soar_ray.data.dataset import ImageCaptionDataset, build_index
from soar_ray.data.loader import iter_batches
from soar_ray.stages.context import StageContext
from soar_ray.stages.loop import StageLoop, StageResult, StageStart
from soar_ray.workers.grpo import RolloutInfo
from soar_ray.workers.learner import Learner
from soar_ray.workers.rollout import RolloutWorker


class AuxPrefetcher:
    """Keeps the rollout workers `max_staleness` steps ahead of the learners."""

    def __init__(self, ctx: StageContext, batches: Iterator[list[dict[str, Any]]], depth: int):
        self.ctx, self.batches, self.depth = ctx, batches, depth
        self.queue: deque[list[RolloutCall]] = deque()

    def next(self) -> tuple[list[ray.ObjectRef], int, float]:
        """The next step's per-rank inputs (refs that exist: a call lost with its worker has
        been rerun), the oldest version among them, and the rollout workers' samples per second
        making them (per worker's busy time, as GRPO's `sampling_images_per_s`)."""
        while len(self.queue) <= self.depth:
            batches = next(self.batches, None)
            if batches is None:
                break
            self.queue.append([self.ctx.rollouts.submit(RolloutWorker.rollout, batch, num_returns=2)
                               for batch in batches])  # fmt: skip
        calls = self.queue.popleft()
        self.ctx.rollouts.wait(calls)
        infos: list[RolloutInfo] = ray.get([call.refs[1] for call in calls])
        busy_s = sum(info.seconds for info in infos) / len(self.ctx.rollouts)
        num_samples = self.ctx.job.data.batch_size * len(calls)
        return ([call.refs[0] for call in calls], min(info.version for info in infos),
                num_samples / busy_s)  # fmt: skip


def check_soar_stage(job: JobConfig, stage_index: int) -> None:
    """Every row of `data.jsonl` parses and names an image that exists (else file:line of the
    first bad one, with `on_bad_sample: error`), before any actor starts. The images themselves
    are opened when the stage builds its index (decoded with `data.verify_images`)."""
    data = job.data
    if data.source != "jsonl":
        return
    with data_errors(job):
        build_index(Path(data.jsonl), Path(data.image_dir), on_bad_sample=data.on_bad_sample,
                    open_images=False, max_samples=data.max_samples,
                    caption_key=data.caption_key)  # fmt: skip


def skipped_rows(dataset) -> dict[str, int]:
    """The rows `data.on_bad_sample: skip` left out of an image set, by reason, as metrics
    (`data_skipped_rows`, `data_skipped_<reason>`), after saying so; none for a latent cache."""
    if not isinstance(dataset, ImageCaptionDataset) or not dataset.skipped:
        return {}
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(dataset.skipped.items()))
    print(f"soar-ray: data.on_bad_sample: skip left out {dataset.skipped.total()} rows of "
          f"{dataset.jsonl_path} ({reasons}); kept {len(dataset)}")  # fmt: skip
    return {"data_skipped_rows": dataset.skipped.total(),
            **{f"data_skipped_{reason}": n for reason, n in dataset.skipped.items()}}  # fmt: skip


def run_soar_stage(ctx: StageContext, stage_index: int, start: StageStart) -> StageResult:
    """Train `job.stages[stage_index]` on the context's actors."""
    job, stage = ctx.job, ctx.job.stages[stage_index]
    dataset = build_dataset(job)
    skipped = skipped_rows(dataset)
    world = job.cluster.num_learners
    samplers = [build_sampler(job, dataset, rank, world) for rank in range(world)]
    loop = StageLoop(ctx, stage_index, start, total=stage.num_steps, unit="step")
    accumulation = stage.gradient_accumulation_steps
    batches = iter_batches(dataset, samplers, first_step=loop.step,
                           num_steps=stage.num_steps - loop.step,
                           num_workers=job.data.num_workers)  # fmt: skip
    disaggregated = stage.mode == "disaggregated"
    prefetch = AuxPrefetcher(ctx, batches, stage.max_staleness) if disaggregated else None
    if ctx.sync is not None:
        ctx.sync.push(loop.version)
    if job.logging.sample_every and loop.step == 0:
        ctx.render_samples(loop.name, 0, loop.version)

    def train(inputs: list) -> list[ray.ObjectRef]:
        return ctx.learners.scatter(Learner.train, [(x,) for x in inputs])

    queued: list[ray.ObjectRef] | None = None
    for step in loop:
        start_time = time.perf_counter()
        if prefetch is not None:
            inputs, made_with, rollout_samples_per_s = prefetch.next()
            metrics = ctx.learners.get(train(inputs))[0]
            metrics["staleness"] = loop.version - made_with
            metrics["rollout_samples_per_s"] = rollout_samples_per_s
            assert metrics["staleness"] <= stage.max_staleness, metrics  # invariant of the queue
        else:
            # The next step's call is queued behind this one unless a checkpoint or sample grid
            # reads the state in between: its batch travels to the learners while they train.
            running, queued = queued or train(next(batches)), None
            if not loop.holds_after(step):
                queued = train(next(batches))
            metrics = ctx.learners.get(running)[0]
        if step % accumulation == 0:
            loop.version += 1
            if disaggregated:
                ctx.sync.push(loop.version)  # queued before the next rollout calls on every worker
        seconds = time.perf_counter() - start_time
        metrics["samples_per_s"] = job.data.batch_size * world / seconds
        metrics |= skipped  # the data rows left out, in the stage's first record
        skipped = {}
        loop.end(metrics, {"loss": f"{metrics['loss']:.4f}", "sps": f"{metrics['samples_per_s']:.1f}"},
                 render=lambda: ctx.render_samples(loop.name, loop.step, loop.version))  # fmt: skip
    return loop.close()
