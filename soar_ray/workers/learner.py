"""The learner: one data-parallel rank's trainable denoiser, whatever the stage's algorithm.

`Learner` owns what every algorithm needs: the training engine (DeepSpeed ZeRO or the in-process
LocalEngine, see engine.py), the trainable parameters (all weights or LoRA adapters), the EMA, the
random stream, weight export and checkpoints. Each stage builds a fresh engine and a per-algorithm
step object (`SoarStep`, `GrpoStep`) that holds the algorithm's math; `Learner.train` hands it a
batch. At the end of a stage `finish_stage` turns the stage's output (EMA weights where enabled,
LoRA merged) into the live weights of a plain transformer, so the next stage starts from them
(SPEC §4).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soar_ray.algo.flow import cond_to
from soar_ray.config import EmaConfig, JobConfig, StageBase
from soar_ray.errors import WeightGroupBroken
from soar_ray.models import SD3Model, add_lora, has_lora, merge_lora, save_transformer
from soar_ray.models import trainable_parameters as named_trainable
from soar_ray.models.build import load_transformer
from soar_ray.models.sd3 import compile_blocks, move, set_activation_checkpointing
from soar_ray.workers.engine import (
    LocalEngine,
    build_deepspeed_engine,
    deepspeed_config,
    load_weights_only,
)
from soar_ray.workers.grpo import GrpoStep
from soar_ray.workers.rollout import generate_images
from soar_ray.workers.soar import SoarStep
from soar_ray.workers.weight_transfer import Push, WeightGroup, listen

ENGINE_TAG = "engine"

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over data-parallel ranks (identity in one process)."""

STEPS: dict[str, type[SoarStep] | type[GrpoStep]] = {"soar": SoarStep, "grpo": GrpoStep}
"""stage.algorithm -> the learner-side step of that algorithm."""


def prepare_stage_model(
    transformer: torch.nn.Module, stage: StageBase, seed: int
) -> list[torch.nn.Parameter]:
    """Add the stage's LoRA adapters (if any) and return the parameters it trains."""
    lora = stage.lora
    if lora.enabled:
        add_lora(transformer, rank=lora.r, alpha=lora.alpha, targets=lora.target_modules,
                 seed=seed, init=lora.init, dropout=lora.dropout)  # fmt: skip
    else:
        transformer.requires_grad_(True)
    return [p for _, p in named_trainable(transformer)]


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' warnings off inside the block (restored after)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


class Ema:
    """EMA of trainable weights with warm-up decay min((1 + n) / (10 + n), decay) (SPEC §3).

    The average is kept in fp32 whatever the weights' precision: a bf16 average moves only where
    (1 - decay) times the gap exceeds half a bf16 step of the weight (8 bits of mantissa), so at
    decay 0.99 it stops following gaps below about 20 % of the weight and stays near its
    warm-up value."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: EmaConfig) -> None:
        self.params, self.cfg = params, cfg
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in params]
        self.num_updates = 0

    @torch.no_grad()
    def after_step(self, optimizer_step: int) -> None:
        """Update every `cfg.every` optimizer steps."""
        if optimizer_step % self.cfg.every:
            return
        decay = min((1 + self.num_updates) / (10 + self.num_updates), self.cfg.decay)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for shadow, param in zip(self.shadow, params, strict=True):
            param.copy_(shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = [t.to(p.device, torch.float32)
                       for t, p in zip(state["shadow"], self.params, strict=True)]  # fmt: skip
        self.num_updates = state["num_updates"]


class Learner:
    """One data-parallel rank; `setup_stage` builds the engine and the algorithm's step."""

    def __init__(
        self,
        job: JobConfig,
        model: SD3Model,
        *,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: AllReduce | None = None,
        distributed: bool = True,
        uncond: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if world_size > 1 and all_reduce is None:
            raise ValueError("world_size > 1 needs an all_reduce across ranks")
        self.job, self.model = job, model
        self.rank, self.world_size, self.distributed = rank, world_size, distributed
        self.zero_stage = job.deepspeed.zero_stage if distributed else 0
        self.all_reduce = all_reduce or (lambda tensor: tensor)
        self.device = next(model.transformer.parameters()).device
        # The latent cache's encoding of "" goes to the device once, not at every step.
        self._uncond = None if uncond is None else cond_to(uncond, self.device)
        self.stage_index: int | None = None
        self.engine = self.ema = self.step = self.reference = None
        self.params: list[torch.nn.Parameter] = []
        self.generator = torch.Generator(self.device)
        self.num_skipped = 0
        """Optimizer steps skipped for a non-finite loss or gradient in the current `train`."""
        self.num_skipped_in_a_row = 0
        """Optimizer steps skipped since the last applied one (counted from `setup_stage`)."""
        self.weight_group: WeightGroup | None = None
        self._weight_listener: socket.socket | None = None
        self.pushed: Push | None = None
        """Rank 0: the last push into the weight group, its buckets kept for restored workers."""

    # ---- stage lifecycle ----------------------------------------------------------------------

    def setup_stage(self, stage_index: int) -> None:
        """Fresh engine, trainable parameters, EMA, random stream and step for the stage."""
        if self.engine is not None:
            raise RuntimeError("finish_stage must end the previous stage before setup_stage")
        job, stage = self.job, self.job.stages[stage_index]
        step_type = STEPS[stage.algorithm]
        transformer = self.model.transformer
        # Full fine-tuning keeps a frozen copy of the stage's initial weights as the reference
        # policy; a LoRA stage's reference is its base model with the adapters disabled (SPEC §3).
        if step_type.needs_reference(stage) and not stage.lora.enabled:
            self.reference = copy.deepcopy(transformer).requires_grad_(False).eval()
        self.params = prepare_stage_model(transformer, stage, seed=job.seed)
        set_activation_checkpointing(transformer, job.deepspeed.activation_checkpointing)
        if job.deepspeed.compile_blocks:
            compile_blocks(transformer, "deepspeed.compile_blocks")
        transformer.train()
        micro_batch, accumulation = step_type.batching(job, stage)
        if self.distributed:
            config = deepspeed_config(
                job.deepspeed, stage.optimizer, micro_batch_size=micro_batch,
                gradient_accumulation_steps=accumulation, world_size=self.world_size,
            )  # fmt: skip
            self.engine = build_deepspeed_engine(transformer, self.params, config, stage.optimizer)
        else:
            self.engine = LocalEngine(self.params, stage.optimizer, accumulation)
        self.ema = Ema(self.params, stage.ema) if stage.ema.enabled else None
        # One stream per rank and stage: every draw of the step comes from it.
        self.generator.manual_seed(job.seed + self.rank + 7919 * stage_index)
        self.stage_index = stage_index
        self.num_skipped_in_a_row = 0
        self.step = step_type(self, stage)

    def train(self, *inputs: Any) -> dict[str, float]:
        """One training call of the stage's algorithm (a SOAR step, a GRPO epoch's updates)."""
        if self.step is None:
            raise RuntimeError("setup_stage must be called before train")
        self.num_skipped = 0
        metrics = self.step.train(*inputs)
        return metrics | self.memory_metrics() | {
            "skipped_steps": self.num_skipped,
            "skipped_steps_in_a_row": self.num_skipped_in_a_row,
        }  # fmt: skip

    def finish_stage(self) -> None:
        """Make the stage output (EMA where enabled, LoRA merged) the live weights of a plain
        transformer and drop the engine, so the next stage starts fresh (SPEC §4). Collective
        under ZeRO-3: every rank must call it."""
        transformer = self.stage_output()
        if has_lora(transformer):
            merge_lora(transformer)
        self.engine.destroy()
        self.engine = self.ema = self.step = self.reference = self.pushed = None
        self.params, self.stage_index = [], None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        move(transformer, self.device, None)
        self.model.transformer = transformer

    def load_transformer(self, path: str | Path) -> None:
        """Replace the live weights by a diffusers transformer folder (a finished stage's output,
        when a run resumes inside a later stage)."""
        if self.engine is not None:
            raise RuntimeError("load_transformer between stages only")
        dtype = next(self.model.transformer.parameters()).dtype
        self.model.transformer = load_transformer(path, self.device, dtype)

    # ---- conditioning and memory --------------------------------------------------------------

    def uncond(self) -> dict[str, torch.Tensor]:
        """Encoding of "" (from the latent cache when training from one)."""
        if self._uncond is None:
            self._uncond = self.model.uncond(1)
        return cond_to(self._uncond, self.device)

    def memory_metrics(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        return {"gpu_peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def backward_step(self, loss: torch.Tensor) -> None:
        """Backward of this rank's loss, engine.step(), and at an accumulation boundary the EMA
        update, or the count of a skipped step.

        A non-finite loss is backpropagated times NaN, so its gradients are NaN even where the
        loss's own backward would stay finite (an overflowed square): the engine's non-finite
        gradient check, all-reduced over ranks, then refuses the whole step on every rank (every
        engine but DeepSpeed's plain ZeRO-0 fp32 optimizer, which `skip_step` jobs may not use).
        """
        # Times 1 or NaN on the device: no host sync between the forward and the backward.
        finite = torch.isfinite(loss.detach()).all()
        loss = loss * torch.where(finite, 1.0, math.nan).to(loss.dtype)
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return
        if not self.engine.was_step_applied():
            self.num_skipped += 1
            self.num_skipped_in_a_row += 1
            return
        self.num_skipped_in_a_row = 0
        if self.ema is not None:
            self.ema.after_step(self.engine.global_steps)

    def optimizer_metrics(self) -> dict[str, float]:
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "lr": float(self.engine.get_lr()[0]),
        }

    # ---- weights out ----------------------------------------------------------------------------

    def gathered(self):
        """Context in which every parameter is whole on this rank (ZeRO-3 gathers: collective)."""
        if self.zero_stage != 3 or self.engine is None:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.transformer.parameters()))

    def exported(self, ema: bool = False) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """What a weight export sends, as (name, weight, value) on this rank's device: the
        trainable weights (a LoRA stage's adapters only), `value` the weight itself or its EMA.
        Between stages (no engine) the whole state dict. Call inside `gathered()`."""
        if ema and self.ema is None:
            raise ValueError("export_weights(ema=True): the stage keeps no EMA")
        transformer = self.model.transformer
        if self.engine is None:
            return [(name, value, value) for name, value in transformer.state_dict().items()]
        named = named_trainable(transformer)
        values = self.ema.shadow if ema else [p for _, p in named]
        return [(name, p, v) for (name, p), v in zip(named, values, strict=True)]

    def export_weights(self, ema: bool = False) -> dict[str, torch.Tensor] | None:
        """The `exported` weights by name on CPU, live or EMA; rank 0 only, else None.

        Between stages the whole state dict: the full handoff to rollout workers. Collective
        under ZeRO-3: every rank must call it.
        """
        with self.gathered():
            if self.rank != 0:
                return None
            # In the weights' own precision (the fp32 EMA too): what a rollout worker holds.
            return {name: v.detach().to("cpu", p.dtype, copy=True)
                    for name, p, v in self.exported(ema)}  # fmt: skip

    # ---- weights out through the weight group (cluster/weights.py, collective backend) --------

    def listen_weight_group(self, host: str) -> int | None:
        """Rank 0: hold a free port of `host` for the weight group's store; returns it."""
        if self.rank != 0:
            return None
        self._weight_listener = listen(host)
        return self._weight_listener.getsockname()[1]

    def join_weight_group(self, host: str, port: int, size: int, bind: str, timeout_s: float,
                          op_timeout_s: float) -> None:  # fmt: skip
        """Rank 0: (re)build the weight group as its rank 0, serving its store on the port
        `listen_weight_group` holds; a former group is left first."""
        if self.rank != 0:
            return
        self.leave_weight_group()
        listener, self._weight_listener = self._weight_listener, None
        self.weight_group = WeightGroup.join(
            host, port, 0, size, self.device, bind=bind, timeout_s=timeout_s,
            op_timeout_s=op_timeout_s, listen_fd=listener.detach(),
        )  # fmt: skip

    def leave_weight_group(self) -> None:
        """Rank 0: close the weight group (a member is replaced): members still waiting in it
        fail. The broadcasts of the last push are forgotten; its buckets stay the last push."""
        if self.rank != 0 or self.weight_group is None:
            return
        if self.pushed is not None:
            self.pushed.detach()
        self.weight_group.close()
        self.weight_group = None

    def send_weights(self, ema: bool = False) -> None:
        """Broadcast the `exported` weights (live or EMA) into the weight group from rank 0, in
        flat buckets; returns once they are under way (the rollout workers take them when they
        reach their receive). Collective under ZeRO-3: every rank must call it."""
        if self.engine is None:
            raise RuntimeError("send_weights pushes a stage's weights: call it inside a stage")
        with self.gathered():
            if self.rank != 0:
                return
            if self.pushed is not None:
                try:
                    self.pushed.finish()
                except WeightGroupBroken as exc:
                    raise WeightGroupBroken(
                        f"{exc}; no rollout worker was restored since, so the weight group was "
                        "not rebuilt and the run stops: resume with checkpoint.resume: auto "
                        "(cluster.weight_sync: object_store does without the group)"
                    ) from exc
            self.pushed = self.weight_group.send(self.exported(ema))

    def pushed_weights(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: the weights of the last `send_weights` by name on CPU (what a restored rollout
        worker loads); None on the other ranks."""
        if self.rank != 0:
            return None
        if self.pushed is None:
            raise RuntimeError("pushed_weights: no weights were pushed in this stage")
        return self.pushed.weights()

    def stage_output(self) -> torch.nn.Module:
        """The stage output as a plain CPU transformer on every rank: the live weights with the
        EMA copied in where enabled, LoRA adapters kept. Collective under ZeRO-3."""
        with self.gathered():
            state = {k: v.detach().cpu().clone() for k, v in
                     self.model.transformer.state_dict().items()}  # fmt: skip
        transformer = type(self.model.transformer).from_config(self.model.transformer.config)
        if has_lora(self.model.transformer):
            prepare_stage_model(transformer, self.job.stages[self.stage_index], seed=0)
        move(transformer, "cpu", next(iter(state.values())).dtype)
        transformer.load_state_dict(state)
        if self.ema is not None:
            self.ema.copy_to([p for _, p in named_trainable(transformer)])
        return transformer

    def save_transformer(self, path: str | Path) -> str | None:
        """The stage output on rank 0 as a diffusers folder (EMA where enabled, LoRA merged); a
        LoRA stage also writes its adapter in peft format to `path`/../lora (load it with
        `transformer.load_lora_adapter(folder, prefix=None, use_safetensors=True)`). Collective
        under ZeRO-3."""
        transformer = self.stage_output()
        if self.rank != 0:
            return None
        path = Path(path)
        if has_lora(transformer):
            # save_lora_adapter calls `to(dtype=None)`, which diffusers warns about as a cast.
            with quiet_diffusers():
                transformer.save_lora_adapter(str(path.parent / "lora"))
            merge_lora(transformer)
        return str(save_transformer(transformer, path))

    @torch.no_grad()
    def generate_images(self, prompts: list[str], **kwargs: Any) -> np.ndarray:
        """uint8 images [B, H, W, 3] with the live weights; every rank renders (ZeRO-3 gathers)."""
        from soar_ray.metrics import to_uint8_images

        with self.gathered():
            return to_uint8_images(generate_images(self.model, prompts, **kwargs))

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, folder: str | Path) -> None:
        """Engine state of every rank under folder/engine; this rank's RNG, its count of skipped
        steps in a row (and its EMA)."""
        folder = Path(folder)
        self.engine.save_checkpoint(str(folder), tag=ENGINE_TAG, save_latest=False)
        rank_state = {"generator": self.generator.get_state(),
                      "skipped_in_a_row": self.num_skipped_in_a_row}  # fmt: skip
        if self.ema is not None:
            rank_state["ema"] = self.ema.state_dict()
        torch.save(rank_state, folder / f"rank-{self.rank:05d}.pt")

    def load_checkpoint(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.engine.load_checkpoint(str(folder), tag=ENGINE_TAG)
        rank_state = load_weights_only(folder / f"rank-{self.rank:05d}.pt")
        self.generator.set_state(rank_state["generator"])
        # A streak of skipped steps goes on across a resume (checkpoints written before this
        # count was kept have none: they start it at 0, as their runs did).
        self.num_skipped_in_a_row = int(rank_state.get("skipped_in_a_row", 0))
        if self.ema is not None:
            self.ema.load_state_dict(rank_state["ema"])
