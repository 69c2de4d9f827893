"""The Flow-GRPO stage driver (SPEC §3), one loop read top to bottom:

prompts -> rollout workers (SDE samples with log-probs, decoded) -> reward actors (each batch
scored as soon as it is decoded, while the workers sample on) -> advantages per prompt group,
all-zero groups dropped -> learners (PPO-clip + KL updates over the stored trajectories) ->
weight sync -> checkpoint / log / sample grid / evaluation.

`max_staleness: 0` is on-policy: epoch n + 1 is sampled with the weights epoch n produced.
`max_staleness: k` submits the sampling of epochs up to n + k before waiting for the learners on
epoch n, so sampling overlaps training; `staleness` logs the lag in policy versions.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import ray
import torch

from soar_ray.algo.grpo import group_advantages
from soar_ray.cluster.rewards import PoolOutput, RewardHandle, merge_outputs
from soar_ray.config import ConfigError, GrpoStage, JobConfig, PromptsConfig
from soar_ray.data.prompts import Prompt, load_prompt_set
from soar_ray.eval.sampling import SamplingSettings, eval_items, submit_eval
from soar_ray.stages.context import StageContext
from soar_ray.stages.loop import StageLoop, StageResult, StageStart, derived_seed
from soar_ray.workers.grpo import (
    GrpoPlan,
    MicroBatch,
    RolloutInfo,
    SampleRequest,
    UpdatePlan,
    micro_batches_per_update,
)
from soar_ray.workers.learner import Learner
from soar_ray.workers.rollout import RolloutWorker


def load_prompts(cfg: PromptsConfig, field: str) -> list[Prompt]:
    """A prompt set, or a ConfigError naming the field and the file's bad line."""
    try:
        return load_prompt_set(cfg.path, cfg.kind)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: {exc}") from exc


def check_grpo_stage(job: JobConfig, stage_index: int) -> None:
    """The prompt sets load (not missing, not empty, every line valid) before any actor starts."""
    load_prompts(job.data.prompts, "data.prompts")
    if job.stages[stage_index].eval_every:
        load_prompts(job.data.eval_prompts, "data.eval_prompts")


def epoch_prompts(num_prompts: int, num_groups: int, seed: int) -> list[int]:
    """The prompt indices of one epoch: a seeded permutation, repeated when the set is small."""
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    while len(chosen) < num_groups:
        chosen += torch.randperm(num_prompts, generator=generator).tolist()
    return chosen[:num_groups]


@dataclass
class EpochRollout:
    """One epoch's finished rollout calls (their results exist) and their scoring in flight:
    call k covers images bounds[k] of the epoch."""

    prompts: list[Prompt]
    """The prompt of every image; images of one group are consecutive."""
    group_ids: np.ndarray
    """[N] the group (prompt) of every image."""
    bounds: list[tuple[int, int]]
    trajectories: list[ray.ObjectRef]
    images: list[ray.ObjectRef]
    infos: list[ray.ObjectRef]
    rewards: list[RewardHandle]


def sample_epoch(ctx: StageContext, stage_index: int, prompts: list[Prompt],
                 epoch: int) -> EpochRollout:  # fmt: skip
    """Sample an epoch: every rollout call is submitted at once and each call's images go to
    scoring as soon as that call has finished (a call lost with its worker is rerun first, so
    scoring and training only ever get results that exist); returns once every call is done,
    while the last batches are still being scored."""
    job, stage = ctx.job, ctx.job.stages[stage_index]
    chosen = epoch_prompts(len(prompts), stage.num_groups_per_epoch,
                           derived_seed(job.seed, stage_index, epoch))  # fmt: skip
    per_image = [prompts[i] for i in chosen for _ in range(stage.group_size)]
    group_ids = np.repeat(np.arange(len(chosen)), stage.group_size)
    bounds = [(start, min(start + stage.sample_batch_size, len(per_image)))
              for start in range(0, len(per_image), stage.sample_batch_size)]  # fmt: skip
    calls = []
    for k, (start, stop) in enumerate(bounds):
        request = SampleRequest([p.text for p in per_image[start:stop]],
                                derived_seed(job.seed, stage_index, epoch, k))  # fmt: skip
        calls.append(ctx.rollouts.submit(RolloutWorker.rollout, request, num_returns=3))
    rewards: dict[int, RewardHandle] = {}
    for call in ctx.rollouts.finished(calls):
        k = calls.index(call)
        batch = per_image[bounds[k][0] : bounds[k][1]]
        rewards[k] = ctx.rewards.submit(call.refs[1], [p.text for p in batch],
                                        [p.metadata or None for p in batch],
                                        weights=stage.rewards)  # fmt: skip
    return EpochRollout(per_image, group_ids, bounds, [c.refs[0] for c in calls],
                        [c.refs[1] for c in calls], [c.refs[2] for c in calls],
                        [rewards[k] for k in range(len(calls))])  # fmt: skip


def plan_epoch(
    rows: list[tuple[int, int]], advantages: list[float], stage: GrpoStage, num_learners: int,
    seed: int,
) -> list[tuple[GrpoPlan, list[int]]]:  # fmt: skip
    """Per rank: its plan over every inner epoch and update, and the rollout calls it reads.

    Each inner epoch reshuffles the samples, splits them into `num_updates_per_epoch` updates and
    each update into the same number of micro-batch slots on every rank (the engines'
    accumulation is fixed); a slot left empty by dropped groups becomes a weight-0 stand-in, so
    every rank runs the same backward passes.
    """
    num_micro = micro_batches_per_update(stage, num_learners)
    generator = torch.Generator().manual_seed(seed)
    per_rank: list[list[UpdatePlan]] = [[] for _ in range(num_learners)]
    for _ in range(stage.num_inner_epochs):
        order = torch.randperm(len(rows), generator=generator).numpy()
        for update in np.array_split(order, stage.num_updates_per_epoch):
            slots = np.array_split(update, num_learners * num_micro)
            for rank in range(num_learners):
                micro = []
                for slot in slots[rank * num_micro : (rank + 1) * num_micro]:
                    if len(slot):
                        micro.append(MicroBatch(tuple(rows[i] for i in slot),
                                                tuple(advantages[i] for i in slot)))  # fmt: skip
                    else:
                        micro.append(MicroBatch((rows[0],), (0.0,), real=False))
                per_rank[rank].append(UpdatePlan(tuple(micro), len(update)))
    plans = []
    for updates in per_rank:
        calls = sorted({b for u in updates for m in u.micro_batches for b, _ in m.rows})
        local = {b: i for i, b in enumerate(calls)}
        updates = tuple(
            UpdatePlan(tuple(MicroBatch(tuple((local[b], r) for b, r in m.rows), m.advantages,
                                        m.real) for m in u.micro_batches), u.num_samples)
            for u in updates
        )  # fmt: skip
        plans.append((GrpoPlan(updates), calls))
    return plans


def trained_samples(
    output: PoolOutput, group_ids: np.ndarray, stage: GrpoStage
) -> tuple[np.ndarray, torch.Tensor]:
    """Indices of the samples to train on and their advantages: samples no reward dropped, in
    groups whose advantages are not all zero (SPEC §3)."""
    kept = np.flatnonzero(output.kept)
    if not len(kept):  # every sample dropped by `on_bad_score: drop`
        return kept, torch.zeros(0, dtype=torch.float64)
    advantages, keep = group_advantages(
        torch.from_numpy(output.scores[kept]), torch.from_numpy(group_ids[kept]),
        global_std=stage.global_std, adv_clip_max=stage.adv_clip_max,
    )  # fmt: skip
    return kept[keep.numpy()], advantages[keep]


def reward_metrics(output: PoolOutput, prefix: str) -> dict[str, float]:
    """Mean and std of the weighted total and of every reward component over kept samples."""
    kept = output.kept
    metrics = {f"{prefix}_mean": float(output.scores[kept].mean()),
               f"{prefix}_std": float(output.scores[kept].std())}  # fmt: skip
    for name, values in output.components.items():
        metrics[f"{prefix}_{name}_mean"] = float(np.nanmean(values[kept]))
        metrics[f"{prefix}_{name}_std"] = float(np.nanstd(values[kept]))
    return metrics


def run_grpo_stage(ctx: StageContext, stage_index: int, start: StageStart) -> StageResult:
    """Train `job.stages[stage_index]` on the context's actors."""
    job, stage = ctx.job, ctx.job.stages[stage_index]
    prompts = load_prompts(job.data.prompts, "data.prompts")
    eval_prompts = []
    if stage.eval_every:
        eval_prompts = load_prompts(job.data.eval_prompts, "data.eval_prompts")
        eval_prompts = eval_prompts[: stage.num_eval_prompts]
    loop = StageLoop(ctx, stage_index, start, total=stage.num_epochs, unit="epoch")
    ctx.sync.push(loop.version)
    if stage.eval_every and loop.step == 0:
        evaluate(ctx, stage_index, loop, eval_prompts)
    pending: deque[EpochRollout] = deque()
    next_epoch = loop.step + 1
    for epoch in loop:
        start_time = time.perf_counter()
        if not pending:
            pending.append(sample_epoch(ctx, stage_index, prompts, next_epoch))
            next_epoch += 1
        rollout = pending.popleft()
        # Scores arrive batch by batch while later batches still sample.
        output = merge_outputs([handle.result() for handle in rollout.rewards])
        infos: list[RolloutInfo] = ray.get(rollout.infos)
        waited = time.perf_counter() - start_time
        used, advantages = trained_samples(output, rollout.group_ids, stage)
        metrics = epoch_metrics(stage, rollout, output, used, advantages) | {
            "staleness": loop.version - min(info.version for info in infos)
        }
        train_refs = []
        if len(used):
            rows = [(int(i) // stage.sample_batch_size, int(i) % stage.sample_batch_size)
                    for i in used]  # fmt: skip
            plans = plan_epoch(rows, advantages.tolist(), stage, job.cluster.num_learners,
                               derived_seed(job.seed, stage_index, epoch, -1))  # fmt: skip
            shards = [(plan, *[rollout.trajectories[c] for c in calls]) for plan, calls in plans]
            train_refs = ctx.learners.scatter(Learner.train, shards)
        while next_epoch <= min(epoch + stage.max_staleness, stage.num_epochs):
            pending.append(sample_epoch(ctx, stage_index, prompts, next_epoch))  # overlaps training
            next_epoch += 1
        if train_refs:
            metrics |= ctx.learners.get(train_refs)[0]
            loop.version += stage.num_updates_per_epoch * stage.num_inner_epochs
            ctx.sync.push(loop.version)
        metrics |= speed_metrics(stage, rollout, output, infos, len(used), len(ctx.rollouts),
                                 waited, time.perf_counter() - start_time,
                                 metrics.get("train_seconds"))  # fmt: skip
        postfix = {"reward": f"{metrics['reward_mean']:.4f}", "kl": f"{metrics.get('kl', 0):.2e}"}
        loop.end(metrics, postfix, render=lambda r=rollout, o=output: render_epoch(ctx, loop, r, o))
        if loop.due(stage.eval_every):
            evaluate(ctx, stage_index, loop, eval_prompts)
    return loop.close()


def epoch_metrics(stage: GrpoStage, rollout: EpochRollout, output: PoolOutput, used: np.ndarray,
                  advantages: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """Rewards (total and every component), advantages and what was left out of training; the
    advantage statistics only when some sample is trained (every group flat: none)."""
    trained_groups = len(np.unique(rollout.group_ids[used]))
    metrics = reward_metrics(output, "reward") | {
        "dropped_group_fraction": 1 - trained_groups / stage.num_groups_per_epoch,
        "num_dropped_samples": output.num_dropped, "num_trained_samples": len(used),
    }  # fmt: skip
    if len(advantages):
        metrics |= {"advantage_mean": float(advantages.mean()),
                    "advantage_std": float(advantages.std(correction=0)),
                    "advantage_abs_mean": float(advantages.abs().mean())}  # fmt: skip
    return metrics


def speed_metrics(
    stage: GrpoStage, rollout: EpochRollout, output: PoolOutput, infos: list[RolloutInfo],
    num_trained: int, num_workers: int, waited: float, epoch_s: float, train_s: float | None,
) -> dict[str, float]:  # fmt: skip
    """Images per second of sampling (per worker's busy time), scoring, training and the whole
    epoch; how long the driver waited for samples and how much sampling hid behind training."""
    num_images = len(rollout.prompts)
    sampling_s = sum(info.seconds for info in infos) / num_workers
    training = num_trained * stage.num_inner_epochs / train_s if train_s else 0.0
    return {
        "sample_wait_seconds": waited, "overlap_seconds": max(sampling_s - waited, 0.0),
        "sampling_images_per_s": num_images / sampling_s,
        "scoring_images_per_s": num_images / max(max(output.seconds.values()), 1e-9),
        "training_images_per_s": training, "epoch_images_per_s": num_images / epoch_s,
    }  # fmt: skip


def render_epoch(ctx: StageContext, loop: StageLoop, rollout: EpochRollout,
                 output: PoolOutput) -> None:  # fmt: skip
    """The first image of the epoch's first groups, captioned with reward and prompt."""
    stage = ctx.job.stages[loop.stage_index]
    count = min(ctx.job.logging.num_sample_prompts, stage.num_groups_per_epoch)
    first = [g * stage.group_size for g in range(count)]
    calls = sorted({i // stage.sample_batch_size for i in first})
    arrays = dict(zip(calls, ray.get([rollout.images[c] for c in calls])))
    images = np.stack([arrays[i // stage.sample_batch_size][i % stage.sample_batch_size]
                       for i in first])  # fmt: skip
    captions = [f"{output.scores[i]:.3f} {rollout.prompts[i].text}" for i in first]
    ctx.save_grid(images, captions, f"{loop.name}-epoch", loop.step)


def evaluate(ctx: StageContext, stage_index: int, loop: StageLoop, prompts: list[Prompt]) -> None:
    """ODE samples (noise 0, `eval_num_sampling_steps`) of the evaluation prompts with the EMA
    weights where kept, scored by the stage's rewards and its evaluation-only rewards: the
    sampling of `soar-ray eval`, one image a prompt, the same seeds at every evaluation."""
    job, stage = ctx.job, ctx.job.stages[stage_index]
    if stage.ema.enabled and loop.step > 0:
        ctx.sync.push(loop.version, ema=True)
    weights = {name: 0.0 for name in stage.eval_rewards} | dict(stage.rewards)
    settings = SamplingSettings(
        stage.eval_num_sampling_steps, stage.cfg_scale, job.model.resolution
    )
    items = eval_items(len(prompts), 1, derived_seed(job.seed, stage_index))
    batches = submit_eval(ctx.rollouts, ctx.rewards, prompts, items, settings,
                          stage.sample_batch_size, weights)  # fmt: skip
    output = merge_outputs([batch.scores.result() for batch in batches])
    if stage.ema.enabled and loop.step > 0:
        ctx.sync.push(loop.version)  # back to the live policy for sampling
    ctx.log(loop.name, loop.step, reward_metrics(output, "eval_reward"))
    count = min(job.logging.num_sample_prompts, len(prompts))
    shown = batches[: -(-count // stage.sample_batch_size)]
    images = np.concatenate(ray.get([batch.images for batch in shown]))[:count]
    captions = [f"{output.scores[i]:.3f} {prompts[i].text}" for i in range(count)]
    ctx.save_grid(images, captions, f"{loop.name}-eval", loop.step)
