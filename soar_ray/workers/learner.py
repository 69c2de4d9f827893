"""SOAR learner: one data-parallel rank's trainable denoiser, optimizer and SOAR step (SPEC §1).

The learner talks to its optimizer through the training API of a DeepSpeed engine
(`backward`, `step`, `get_global_grad_norm`, `get_lr`); `LocalEngine` provides it in one process
with plain torch, and is the reference that distributed engines are checked against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from soar_ray.algo.flow import Cond, make_schedule
from soar_ray.algo.soar import SoarHyperParams, normalize_soar_loss, soar_losses
from soar_ray.config import EmaConfig, OptimizerConfig, SoarStage
from soar_ray.models import SD3Model, add_lora, trainable_parameters

# SD3 and SD3.5 (Medium and Large) train on FlowMatchEulerDiscreteScheduler(shift=3.0).
SD3_SCHEDULE_SHIFT = 3.0

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over data-parallel ranks (identity in one process)."""


def soar_hyperparams(stage: SoarStage) -> SoarHyperParams:
    """The algorithm's hyper-parameters from a validated stage config."""
    return SoarHyperParams(
        lambda_aux=stage.lambda_aux,
        num_rollout_paths=stage.num_rollout_paths,
        trajectory_length=stage.trajectory_length,
        rollout_kind=stage.rollout_kind,
        noise_scale=stage.noise_scale,
        cfg_scale_sampling=stage.cfg_scale_sampling,
        num_sampling_steps=stage.num_sampling_steps,
        cond_dropout_rate=stage.cond_dropout_rate,
        timestep_density=stage.density.scheme,
        logit_mean=stage.density.logit_mean,
        logit_std=stage.density.logit_std,
        mode_scale=stage.density.mode_scale,
        loss_weighting=stage.weighting_scheme,
        sigma_upper_ratio=stage.sigma_upper_ratio,
        fused=stage.aux_eval == "fused",
    )


def lr_factor(step: int, cfg: OptimizerConfig) -> float:
    """Learning-rate multiplier after `step` optimizer steps: constant, or linear warm-up."""
    if cfg.lr_schedule == "warmup" and cfg.warmup_steps > 0:
        return min(1.0, (step + 1) / cfg.warmup_steps)
    return 1.0


class LocalEngine:
    """AdamW, LR schedule, gradient clipping and accumulation behind DeepSpeed's engine API."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimizerConfig,
                 gradient_accumulation_steps: int = 1) -> None:  # fmt: skip
        self.params, self.cfg = params, cfg
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg)
        )
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.micro_steps = 0
        self.global_steps = 0
        self._grad_norm = math.nan

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients; the loss is divided by the accumulation steps as DeepSpeed does."""
        (loss / self.gradient_accumulation_steps).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def step(self) -> None:
        """Clip, update and zero the gradients at an accumulation boundary."""
        if self.is_gradient_accumulation_boundary():
            max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
            # Host sync: the norm is read back for logging once per optimizer step.
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1

    def get_global_grad_norm(self) -> float:
        return self._grad_norm

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "micro_steps": self.micro_steps,
            "global_steps": self.global_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]


class Ema:
    """EMA of trainable weights with warm-up decay min((1 + n) / (10 + n), decay) (SPEC §3)."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: EmaConfig) -> None:
        self.params, self.cfg = params, cfg
        self.shadow = [p.detach().clone() for p in params]
        self.num_updates = 0

    @torch.no_grad()
    def after_step(self, optimizer_step: int) -> None:
        """Update every `cfg.every` optimizer steps."""
        if optimizer_step % self.cfg.every:
            return
        decay = min((1 + self.num_updates) / (10 + self.num_updates), self.cfg.decay)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for shadow, param in zip(self.shadow, params, strict=True):
            param.copy_(shadow)


class SoarLearner:
    """Runs SOAR steps (colocated: the learner does its own no-grad CFG rollout) on one rank."""

    def __init__(
        self,
        model: SD3Model,
        stage: SoarStage,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: AllReduce | None = None,
        uncond: Cond | None = None,
    ) -> None:
        if world_size > 1 and all_reduce is None:
            raise ValueError("world_size > 1 needs an all_reduce across ranks")
        self.model, self.stage = model, stage
        self.hp = soar_hyperparams(stage)
        self.schedule = make_schedule(shift=SD3_SCHEDULE_SHIFT)
        self.rank, self.world_size = rank, world_size
        self.all_reduce = all_reduce or (lambda tensor: tensor)
        self.device = model.transformer.device
        self._uncond = uncond
        if stage.lora.enabled:
            add_lora(model.transformer, rank=stage.lora.r, alpha=stage.lora.alpha,
                     targets=stage.lora.target_modules, seed=seed)  # fmt: skip
        self.params = [p for _, p in trainable_parameters(model.transformer)]
        model.transformer.train()
        self.engine = LocalEngine(self.params, stage.optimizer, stage.gradient_accumulation_steps)
        self.ema = Ema(self.params, stage.ema) if stage.ema.enabled else None
        # One stream per rank: every draw of the step (z1, t0, aux points) comes from it.
        self.generator = torch.Generator(self.device).manual_seed(seed + rank)

    def uncond(self) -> Cond:
        """Encoding of "" (from the latent cache when training from one)."""
        if self._uncond is None:
            self._uncond = self.model.uncond(1)
        return {key: value.to(self.device) for key, value in self._uncond.items()}

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Cond]:
        """Clean latents z0 and text conditioning of a collated batch (raw images or cache)."""
        if "latents" in batch:
            z0, cond = batch["latents"], batch["cond"]
        else:
            z0, cond = (
                self.model.encode_images(batch["pixels"]),
                self.model.encode_prompts(batch["caption"]),
            )
        # fp32 latents: the flow math (z_t0, targets, aux points) runs in fp32 (SPEC §2).
        return z0.to(self.device, torch.float32), {k: v.to(self.device) for k, v in cond.items()}

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One SOAR forward/backward and (at an accumulation boundary) optimizer step."""
        z0, cond = self.encode(batch)
        losses = soar_losses(
            self.model.denoise, z0, cond, self.uncond(), self.schedule, self.hp,
            generator=self.generator,
        )  # fmt: skip
        # One all-reduce carries the global counts (SPEC §1.6) and the logged sums.
        totals = torch.stack([
            losses.sum_main().detach(), losses.sum_aux().detach(),
            losses.main_B.new_tensor(float(losses.num_main)),
            losses.main_B.new_tensor(float(losses.num_aux)),
        ]).double()  # fmt: skip
        sum_main, sum_aux, num_main, num_aux = self.all_reduce(totals).tolist()
        loss = normalize_soar_loss(
            losses.sum_main(), losses.sum_aux(), num_main, num_aux, self.hp.lambda_aux,
            self.world_size,
        )  # fmt: skip
        self.engine.backward(loss)
        self.engine.step()
        if (
            self.ema is not None
            and self.engine.micro_steps % self.engine.gradient_accumulation_steps == 0
        ):
            self.ema.after_step(self.engine.global_steps)
        lam = self.hp.lambda_aux
        return {
            "loss": (sum_main + lam * sum_aux) / max(num_main + lam * num_aux, 1.0),
            "loss_main": sum_main / max(num_main, 1.0),
            "loss_aux": sum_aux / max(num_aux, 1.0),
            "aux_points_per_sample": num_aux / max(num_main, 1.0),
            "sigma_main_mean": float(losses.diagnostics["sigma_main_mean"]),
            "grad_norm": self.engine.get_global_grad_norm(),
            "lr": self.engine.get_lr()[0],
        }
