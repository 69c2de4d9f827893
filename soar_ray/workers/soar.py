"""SOAR on the workers (SPEC §1): the learner's step and the rollout worker's aux-point rollout.

`SoarStep.train` takes either a collated batch (colocated: the learner draws, rolls out with its
own weights and builds the aux points, exactly the reference) or `SoarInputs` a rollout worker
prepared (disaggregated: only the graded forward runs here). `SoarRollout.rollout` prepares such
inputs on a rollout worker, stamped with its policy version.
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch

from soar_ray.algo.flow import Cond, Schedule, cond_to, make_schedule
from soar_ray.algo.soar import (
    SoarHyperParams,
    SoarInputs,
    normalize_soar_loss,
    prepare_soar_inputs,
    soar_losses_from_inputs,
)
from soar_ray.config import JobConfig, SoarStage
from soar_ray.models import SD3Model
from soar_ray.models.sd3 import SD3_SCHEDULE_SHIFT
from soar_ray.workers.grpo import RolloutInfo

if TYPE_CHECKING:
    from soar_ray.workers.learner import Learner
    from soar_ray.workers.rollout import RolloutWorker


def soar_hyperparams(stage: SoarStage) -> SoarHyperParams:
    """The algorithm's hyper-parameters: the stage fields of the same names."""
    return SoarHyperParams(**{f.name: getattr(stage, f.name) for f in fields(SoarHyperParams)})


def encode_batch(
    model: SD3Model, batch: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, Cond]:
    """Clean latents z0 and text conditioning of a collated batch (raw images or cache rows)."""
    if "latents" in batch:
        z0, cond = batch["latents"], batch["cond"]
    else:
        z0 = model.encode_images(batch["pixels"])
        cond = model.encode_prompts(batch["caption"])
    # fp32 latents: the flow math (z_t0, targets, aux points) runs in fp32 (SPEC §2).
    return z0.to(device, torch.float32), cond_to(cond, device)


def prepare_batch(
    owner: Learner | RolloutWorker, batch: dict[str, Any], schedule: Schedule, hp: SoarHyperParams
) -> SoarInputs:
    """Encode a collated batch, then draws, the no-grad CFG rollout and the aux points with the
    owner's weights, uncond and random stream (a learner colocated, a rollout worker otherwise)."""
    z0, cond = encode_batch(owner.model, batch, owner.device)
    return prepare_soar_inputs(owner.model.denoise, z0, cond, owner.uncond(), schedule, hp,
                               generator=owner.generator)  # fmt: skip


class SoarStep:
    """The SOAR training step of one learner rank."""

    def __init__(self, learner: Learner, stage: SoarStage) -> None:
        self.learner, self.hp = learner, soar_hyperparams(stage)
        self.schedule = make_schedule(shift=SD3_SCHEDULE_SHIFT).to(learner.device)

    @staticmethod
    def batching(job: JobConfig, stage: SoarStage) -> tuple[int, int]:
        """(micro-batch per rank, micro-batches per optimizer step) of the engine."""
        return job.data.batch_size, stage.gradient_accumulation_steps

    @staticmethod
    def needs_reference(stage: SoarStage) -> bool:
        """SOAR trains against data, not against a reference policy."""
        return False

    def prepare(self, batch: dict[str, Any]) -> SoarInputs:
        """Draws, no-grad CFG rollout and aux points of a batch with the current weights."""
        return prepare_batch(self.learner, batch, self.schedule, self.hp)

    def train(self, batch: dict[str, Any] | SoarInputs) -> dict[str, float]:
        """Graded forward/backward (after the own rollout for a raw batch), then at an
        accumulation boundary an optimizer step."""
        learner = self.learner
        inputs = batch if isinstance(batch, SoarInputs) else self.prepare(batch)
        losses = soar_losses_from_inputs(
            learner.model.denoise, inputs.to(learner.device), self.schedule, self.hp
        )
        # One all-reduce carries the global counts (SPEC §1.6) and the logged sums. The counts
        # stay on the device (exact small integers in the loss's dtype), so the backward and the
        # optimizer are queued without waiting for the forward; the metrics are read after.
        sum_main_B, sum_aux_B = losses.sum_main(), losses.sum_aux()
        totals = learner.all_reduce(torch.stack([
            sum_main_B.detach(), sum_aux_B.detach(),
            losses.main_B.new_full((), float(losses.num_main)),  # a fill: no host copy
            losses.main_B.new_full((), float(losses.num_aux)),
        ]).double())  # fmt: skip
        num_main_g, num_aux_g = totals[2:].to(sum_main_B.dtype).unbind()
        lam = self.hp.lambda_aux
        loss = normalize_soar_loss(sum_main_B, sum_aux_B, num_main_g, num_aux_g, lam,
                                   learner.world_size)  # fmt: skip
        learner.backward_step(loss)
        sum_main, sum_aux, num_main, num_aux = totals.tolist()
        return {
            "loss": (sum_main + lam * sum_aux) / max(num_main + lam * num_aux, 1.0),
            "loss_main": sum_main / max(num_main, 1.0),
            "loss_aux": sum_aux / max(num_aux, 1.0),
            "aux_points_per_sample": num_aux / max(num_main, 1.0),
            "sigma_main_mean": float(losses.diagnostics["sigma_main_mean"]),
        } | learner.optimizer_metrics()


class SoarRollout:
    """Aux points of the disaggregated mode, made on a rollout worker with its policy version."""

    def __init__(self, worker: RolloutWorker, stage: SoarStage) -> None:
        self.worker, self.hp = worker, soar_hyperparams(stage)
        self.schedule = make_schedule(shift=SD3_SCHEDULE_SHIFT).to(worker.device)

    def rollout(self, batch: dict[str, Any]) -> tuple[SoarInputs, RolloutInfo]:
        """Encode one rank's batch, then draws, CFG rollout and aux points; with the version of
        the weights that made them (the learner then only runs the graded forward) and the
        seconds they took."""
        start = time.perf_counter()
        inputs = prepare_batch(self.worker, batch, self.schedule, self.hp).to("cpu")
        return inputs, RolloutInfo(self.worker.version, time.perf_counter() - start)
