"""SOAR learner: one data-parallel rank's trainable denoiser, engine and SOAR step (SPEC §1).

The learner talks to its optimizer through DeepSpeed's engine API (see engine.py). Distributed
state (process group, ZeRO partitions) lives in the engine; the learner adds the SOAR step, the
cross-rank counts of SPEC §1.6, EMA, weight export and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from soar_ray.algo.flow import Cond, make_schedule
from soar_ray.algo.soar import (
    SoarHyperParams,
    SoarInputs,
    normalize_soar_loss,
    prepare_soar_inputs,
    soar_losses_from_inputs,
)
from soar_ray.config import EmaConfig, SoarStage
from soar_ray.models import SD3Model, add_lora, has_lora, merge_lora, save_transformer
from soar_ray.models import trainable_parameters as named_trainable
from soar_ray.models.sd3 import move

# SD3 and SD3.5 (Medium and Large) train on FlowMatchEulerDiscreteScheduler(shift=3.0).
SD3_SCHEDULE_SHIFT = 3.0
ENGINE_TAG = "engine"

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


def prepare_stage_model(
    transformer: torch.nn.Module, stage: SoarStage, seed: int
) -> list[torch.nn.Parameter]:
    """Add the stage's LoRA adapters (if any) and return the parameters it trains."""
    if stage.lora.enabled:
        add_lora(transformer, rank=stage.lora.r, alpha=stage.lora.alpha,
                 targets=stage.lora.target_modules, seed=seed)  # fmt: skip
    return [p for _, p in named_trainable(transformer)]


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
    return z0.to(device, torch.float32), {k: v.to(device) for k, v in cond.items()}


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

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = [t.to(p.device) for t, p in zip(state["shadow"], self.params, strict=True)]
        self.num_updates = state["num_updates"]


class SoarLearner:
    """Runs SOAR steps on one rank: colocated (own rollout) or from prepared SoarInputs."""

    def __init__(
        self,
        model: SD3Model,
        stage: SoarStage,
        engine,
        params: list[torch.nn.Parameter],
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: AllReduce | None = None,
        uncond: Cond | None = None,
        zero_stage: int = 0,
    ) -> None:
        if world_size > 1 and all_reduce is None:
            raise ValueError("world_size > 1 needs an all_reduce across ranks")
        if stage.ema.enabled and zero_stage == 3:
            raise ValueError("stages.ema.enabled: EMA needs whole parameters; use ZeRO stage <= 2")
        self.model, self.stage, self.engine, self.params = model, stage, engine, params
        self.hp = soar_hyperparams(stage)
        self.schedule = make_schedule(shift=SD3_SCHEDULE_SHIFT)
        self.rank, self.world_size, self.zero_stage = rank, world_size, zero_stage
        self.all_reduce = all_reduce or (lambda tensor: tensor)
        self.device = next(model.transformer.parameters()).device
        self._uncond = uncond
        model.transformer.train()
        self.ema = Ema(params, stage.ema) if stage.ema.enabled else None
        # One stream per rank: every draw of the step (z1, t0, aux points) comes from it.
        self.generator = torch.Generator(self.device).manual_seed(seed + rank)

    def uncond(self) -> Cond:
        """Encoding of "" (from the latent cache when training from one)."""
        if self._uncond is None:
            self._uncond = self.model.uncond(1)
        return {key: value.to(self.device) for key, value in self._uncond.items()}

    def prepare(self, batch: dict[str, Any]) -> SoarInputs:
        """Draws, no-grad CFG rollout and aux points of a batch with the current weights."""
        z0, cond = encode_batch(self.model, batch, self.device)
        return prepare_soar_inputs(
            self.model.denoise, z0, cond, self.uncond(), self.schedule, self.hp,
            generator=self.generator,
        )  # fmt: skip

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One colocated SOAR step: rollout and graded forward/backward on this rank."""
        return self.train_on_inputs(self.prepare(batch))

    def train_on_inputs(self, inputs: SoarInputs) -> dict[str, float]:
        """Graded forward/backward on prepared inputs, then (at a boundary) an optimizer step."""
        losses = soar_losses_from_inputs(
            self.model.denoise, inputs.to(self.device), self.schedule, self.hp
        )
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
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        if self.ema is not None and boundary:
            self.ema.after_step(self.engine.global_steps)
        lam = self.hp.lambda_aux
        grad_norm = self.engine.get_global_grad_norm()
        memory = {}
        if self.device.type == "cuda":
            memory["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return memory | {
            "loss": (sum_main + lam * sum_aux) / max(num_main + lam * num_aux, 1.0),
            "loss_main": sum_main / max(num_main, 1.0),
            "loss_aux": sum_aux / max(num_aux, 1.0),
            "aux_points_per_sample": num_aux / max(num_main, 1.0),
            "sigma_main_mean": float(losses.diagnostics["sigma_main_mean"]),
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "lr": float(self.engine.get_lr()[0]),
        }

    def gathered(self):
        """Context in which every parameter is whole on this rank (ZeRO-3 gathers: collective)."""
        import contextlib

        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.transformer.parameters()))

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Trainable weights by name on CPU (EMA-free, the live policy); rank 0 only, else None.

        Collective under ZeRO-3: every rank must call it.
        """
        with self.gathered():
            if self.rank != 0:
                return None
            return {name: p.detach().cpu().clone() for name, p in
                    named_trainable(self.model.transformer)}  # fmt: skip

    def plain_transformer(self) -> torch.nn.Module | None:
        """A detached CPU copy of the live transformer (LoRA adapters kept); rank 0 only.

        Rebuilt from the config and a gathered state dict rather than deep-copied, so no engine
        hooks or ZeRO partition state come along. Collective under ZeRO-3.
        """
        with self.gathered():
            if self.rank != 0:
                return None
            state = {k: v.detach().cpu().clone() for k, v in
                     self.model.transformer.state_dict().items()}  # fmt: skip
        transformer = type(self.model.transformer).from_config(self.model.transformer.config)
        if has_lora(self.model.transformer):
            prepare_stage_model(transformer, self.stage, seed=0)
        move(transformer, "cpu", next(iter(state.values())).dtype)
        transformer.load_state_dict(state)
        return transformer

    def save_transformer(self, path: str | Path) -> Path | None:
        """The stage output on rank 0: diffusers folder, EMA weights where enabled, LoRA merged.

        Collective under ZeRO-3: every rank must call it.
        """
        transformer = self.plain_transformer()
        if transformer is None:
            return None
        if self.ema is not None:
            self.ema.copy_to([p for _, p in named_trainable(transformer)])
        if has_lora(transformer):
            merge_lora(transformer)
        return save_transformer(transformer, path)

    def save_checkpoint(self, folder: str | Path) -> None:
        """Engine state of every rank under folder/engine, this rank's RNG (and rank 0's EMA)."""
        folder = Path(folder)
        self.engine.save_checkpoint(str(folder), tag=ENGINE_TAG, save_latest=False)
        rank_state = {"generator": self.generator.get_state()}
        if self.ema is not None:
            rank_state["ema"] = self.ema.state_dict()
        torch.save(rank_state, folder / f"rank-{self.rank:05d}.pt")

    def load_checkpoint(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.engine.load_checkpoint(str(folder), tag=ENGINE_TAG)
        rank_state = torch.load(folder / f"rank-{self.rank:05d}.pt", weights_only=False)
        self.generator.set_state(rank_state["generator"])
        if self.ema is not None:
            self.ema.load_state_dict(rank_state["ema"])
