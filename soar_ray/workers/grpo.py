"""Flow-GRPO on the workers (SPEC §3): SDE rollouts with log-probs, and the learner's PPO step.

`GrpoRollout.rollout` samples a batch of prompts with T SDE steps (CFG with cond and uncond in one
batched forward), keeps the trajectory (latents T+1, log-probs T, embeddings) and decodes the final
latents to images for the reward models. `GrpoStep.train` replays stored trajectories: per
micro-batch and per trained timestep one CFG forward/backward of the clipped policy loss plus
beta x KL to the reference policy, gradients accumulated over the update (`UpdatePlan`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from soar_ray.algo.flow import Cond, cat_cond, cond_to, guided_velocity, make_inference_grid
from soar_ray.algo.grpo import grpo_policy_loss, sde_step_with_logprob
from soar_ray.config import GrpoStage, JobConfig
from soar_ray.metrics import to_uint8_images
from soar_ray.models import adapters_disabled
from soar_ray.models.sd3 import SD3_SCHEDULE_SHIFT, sd3_denoise

if TYPE_CHECKING:
    from soar_ray.workers.learner import Learner
    from soar_ray.workers.rollout import RolloutWorker

SUMS = ("policy", "kl", "approx_kl", "clipped", "abs_log_ratio", "count")
"""What a learner sums per (sample, step) for the epoch's metrics."""


def num_train_timesteps(stage: GrpoStage) -> int:
    """floor(T x timestep_fraction): the first steps of each trajectory that are trained."""
    return int(stage.num_sampling_steps * stage.timestep_fraction)


def micro_batches_per_update(stage: GrpoStage, num_learners: int) -> int:
    """Micro-batches one learner runs per optimizer update (before groups are dropped)."""
    per_rank = (
        stage.group_size
        * stage.num_groups_per_epoch
        // (num_learners * stage.num_updates_per_epoch)
    )
    return -(-per_rank // stage.train_batch_size)


@dataclass(frozen=True)
class SampleRequest:
    """One rollout call: prompts (one image each) and the seed of their initial noise and SDE
    noise, so a batch is a pure function of (job seed, epoch, index)."""

    prompts: list[str]
    seed: int


@dataclass
class Trajectories:
    """SDE trajectories of a batch of B images (SPEC §3), on the CPU."""

    latents: torch.Tensor
    """[B, T+1, C, H, W] fp32: the initial noise and the latents after every step."""
    log_probs: torch.Tensor
    """[B, T] fp32: log-prob of each step under the sampling policy."""
    cond: Cond
    """Prompt embeddings of the B images."""
    uncond: Cond
    """Embeddings of "" (batch 1) for the CFG forward."""
    version: int
    """Policy version of the weights that sampled the batch."""

    def rows(self, index: list[int]) -> Trajectories:
        return Trajectories(self.latents[index], self.log_probs[index],
                            {k: v[index] for k, v in self.cond.items()}, self.uncond,
                            self.version)  # fmt: skip


@dataclass(frozen=True)
class RolloutInfo:
    """What the driver reads of a rollout call without fetching its tensors."""

    version: int
    seconds: float


class GrpoRollout:
    """SDE sampling with log-probs on a rollout worker."""

    def __init__(self, worker: RolloutWorker, stage: GrpoStage) -> None:
        self.worker, self.stage = worker, stage
        # On the worker's device: the steps read it without a copy (and the wait a copy makes).
        grid = make_inference_grid(SD3_SCHEDULE_SHIFT, stage.num_sampling_steps)
        self.grid = grid.to(worker.device)

    @torch.no_grad()
    def rollout(self, request: SampleRequest) -> tuple[Trajectories, np.ndarray, RolloutInfo]:
        """Trajectories, uint8 images [B, H, W, 3] and (version, seconds) of one batch."""
        start = time.perf_counter()
        worker, stage, grid = self.worker, self.stage, self.grid
        model, num = worker.model, len(request.prompts)
        resolution = worker.resolution
        factor = model.vae_scale_factor
        generator = torch.Generator("cpu").manual_seed(request.seed)
        shape = (num, model.latent_channels, resolution // factor, resolution // factor)
        # Noise drawn on the CPU so a seed gives the same trajectories on every device: the start
        # and then each step's draw, in that order. It reaches the device at once, and the
        # trajectory comes back at the end: no host sync between the steps.
        draws = [torch.randn(shape, generator=generator) for _ in range(grid.num_steps + 1)]
        x, *noises = torch.stack(draws).to(worker.device).unbind()
        cond = model.encode_prompts(request.prompts)
        uncond = worker.uncond()
        uncond_B = {k: v.expand(num, *v.shape[1:]) for k, v in uncond.items()}
        latents, log_probs = [x], []
        for i in range(grid.num_steps):
            timestep_B = grid.timesteps[i].expand(num)
            v = guided_velocity(model.denoise, x, timestep_B, cond, uncond_B, stage.cfg_scale)
            x, log_prob, _, _ = sde_step_with_logprob(
                x, v, grid.sigmas[i], grid.sigmas[i + 1], noise_level=stage.noise_level,
                noise=noises[i], sde_kind=stage.sde_kind,
            )  # fmt: skip
            latents.append(x)
            log_probs.append(log_prob)
        images = to_uint8_images(model.decode_latents(x))
        trajectories = Trajectories(
            torch.stack(latents, 1).cpu(), torch.stack(log_probs, 1).cpu(),
            cond_to(cond, "cpu"), cond_to(uncond, "cpu"),
            worker.version,
        )  # fmt: skip
        return trajectories, images, RolloutInfo(worker.version, time.perf_counter() - start)


@dataclass(frozen=True)
class MicroBatch:
    """Rows of one learner micro-batch: (trajectory batch, row) pairs and their advantages."""

    rows: tuple[tuple[int, int], ...]
    advantages: tuple[float, ...]
    real: bool = True
    """False: a stand-in for an empty slot (every rank must run the same number of backward
    passes); it is trained with weight 0."""


@dataclass(frozen=True)
class UpdatePlan:
    """The micro-batches of one optimizer update on one rank."""

    micro_batches: tuple[MicroBatch, ...]
    num_samples: int
    """Real samples of this update over all ranks: the loss is their per-step mean."""


@dataclass(frozen=True)
class GrpoPlan:
    """One rank's share of an epoch: its updates (over every inner epoch), in order."""

    updates: tuple[UpdatePlan, ...]


class GrpoStep:
    """PPO-clip + KL updates of one learner rank over stored trajectories (SPEC §3)."""

    def __init__(self, learner: Learner, stage: GrpoStage) -> None:
        self.learner, self.stage = learner, stage
        # On the learner's device: the steps read it without a copy (and the wait a copy makes).
        grid = make_inference_grid(SD3_SCHEDULE_SHIFT, stage.num_sampling_steps)
        self.grid = grid.to(learner.device)
        self.num_timesteps = num_train_timesteps(stage)
        self.accumulation = self.batching(learner.job, stage)[1]

    @staticmethod
    def batching(job: JobConfig, stage: GrpoStage) -> tuple[int, int]:
        """(micro-batch per rank, backward passes per optimizer update) of the engine: every
        micro-batch runs one backward per trained timestep."""
        micro = micro_batches_per_update(stage, job.cluster.num_learners)
        return stage.train_batch_size, micro * num_train_timesteps(stage)

    @staticmethod
    def needs_reference(stage: GrpoStage) -> bool:
        return stage.beta > 0

    def train(self, plan: GrpoPlan, *batches: Trajectories) -> dict[str, float]:
        """Every update of the plan; metrics are means over all ranks' real samples and steps."""
        start = time.perf_counter()
        learner = self.learner
        num_micro = self.accumulation // self.num_timesteps
        if any(len(update.micro_batches) != num_micro for update in plan.updates):
            # The engine steps the optimizer after exactly this many backward passes.
            raise ValueError(f"every update of a GrpoPlan must hold {num_micro} micro-batches")
        # Sums over real samples and steps (all-reduced once at the end), of the epoch and of
        # its first update, made before any optimizer step (on-policy: log-ratio 0). They stay
        # on the device: the host reads them once, after the last backward.
        sums = torch.zeros(2, len(SUMS), dtype=torch.float64, device=learner.device)
        for u, update in enumerate(plan.updates):
            for micro in update.micro_batches:
                terms = self._train_micro_batch(micro, update.num_samples, batches)
                if micro.real:
                    sums[0] += terms
                    if u == 0:
                        sums[1] += terms
        totals = learner.all_reduce(sums).cpu()
        epoch, first = (dict(zip(SUMS, row.tolist())) for row in totals)
        count, first_count = max(epoch["count"], 1.0), max(first["count"], 1.0)
        return {
            "policy_loss": epoch["policy"] / count,
            "kl": epoch["kl"] / count,
            "approx_kl": epoch["approx_kl"] / count,
            "clip_fraction": epoch["clipped"] / count,
            "log_ratio_first": first["abs_log_ratio"] / first_count,
            "kl_first": first["kl"] / first_count,
            "train_seconds": time.perf_counter() - start,
        } | learner.optimizer_metrics()

    def _train_micro_batch(
        self, micro: MicroBatch, num_samples: int, batches: tuple[Trajectories, ...]
    ) -> torch.Tensor:
        """T_train forward/backward passes of one micro-batch; returns the detached `SUMS` over
        its samples and steps."""
        learner, stage = self.learner, self.stage
        traj = _gather(batches, micro.rows)
        device = learner.device
        advantages = torch.tensor(micro.advantages, dtype=torch.float32, device=device)
        num = advantages.shape[0]
        # loss_micro = sum_b l_b * W * GA / (N_update * T_train): after the engine divides by GA
        # and averages over W ranks, the update is the mean over all samples and steps.
        weight = 0.0 if not micro.real else (
            learner.world_size * self.accumulation
            / (num_samples * self.num_timesteps)
        )  # fmt: skip
        # What the steps read reaches the device here, once: a copy inside the loop would wait
        # for the step before it.
        cond = cond_to(traj.cond, device)
        uncond = {k: v.to(device).expand(num, *v.shape[1:]) for k, v in traj.uncond.items()}
        latents, old_log_probs = traj.latents.to(device), traj.log_probs.to(device)
        sigmas, timesteps = self.grid.sigmas, self.grid.timesteps
        sums = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
        for j in range(self.num_timesteps):
            x, x_next = latents[:, j], latents[:, j + 1]
            sigma, sigma_next = sigmas[j], sigmas[j + 1]
            timestep_B = timesteps[j].expand(num)
            v = guided_velocity(learner.model.denoise, x, timestep_B, cond, uncond, stage.cfg_scale)
            _, log_prob, mean, std = sde_step_with_logprob(
                x, v, sigma, sigma_next, noise_level=stage.noise_level, prev_sample=x_next,
                sde_kind=stage.sde_kind,
            )  # fmt: skip
            mean_ref = self._reference_mean(x, x_next, timestep_B, cond, uncond, sigma, sigma_next)
            terms = grpo_policy_loss(
                log_prob, old_log_probs[:, j], advantages, clip_range=stage.clip_range,
                mean_theta=mean if mean_ref is not None else None, mean_ref=mean_ref,
                std=std if mean_ref is not None else None, beta=stage.beta,
            )  # fmt: skip
            loss_B = terms.policy_B + stage.beta * terms.kl_B
            learner.backward_step(loss_B.sum() * weight)
            sums += torch.stack([
                terms.policy_B.detach().sum(), terms.kl_B.detach().sum(), terms.approx_kl_B.sum(),
                terms.clipped_B.sum(), (2 * terms.approx_kl_B).sqrt().sum(),
                loss_B.new_full((), float(num)),
            ]).double()  # fmt: skip
        return sums

    @torch.no_grad()
    def _reference_mean(self, x, x_next, timestep_B, cond, uncond, sigma,
                        sigma_next) -> torch.Tensor | None:  # fmt: skip
        """The reference policy's step mean (no gradient): LoRA disabled, or the frozen copy."""
        learner, stage = self.learner, self.stage
        if stage.beta == 0:
            return None
        if learner.reference is not None:
            denoise = partial(sd3_denoise, learner.reference)
            v_ref = guided_velocity(denoise, x, timestep_B, cond, uncond, stage.cfg_scale)
        else:
            with adapters_disabled(learner.model.transformer):
                v_ref = guided_velocity(learner.model.denoise, x, timestep_B, cond, uncond,
                                        stage.cfg_scale)  # fmt: skip
        _, _, mean_ref, _ = sde_step_with_logprob(
            x, v_ref, sigma, sigma_next, noise_level=stage.noise_level, prev_sample=x_next,
            sde_kind=stage.sde_kind,
        )  # fmt: skip
        return mean_ref


def _gather(batches: tuple[Trajectories, ...], rows: tuple[tuple[int, int], ...]) -> Trajectories:
    """The rows (batch, row) of the given trajectory batches as one batch."""
    parts = [batches[b].rows([r]) for b, r in rows]
    return Trajectories(
        torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]),
        cat_cond([p.cond for p in parts]), parts[0].uncond, min(p.version for p in parts),
    )  # fmt: skip
