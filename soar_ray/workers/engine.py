"""Training engines behind one API (DeepSpeed's): backward, step, grad norm, lr, checkpoints.

`build_deepspeed_engine` wraps the trainable module in a DeepSpeed ZeRO engine (stage 0-3, bf16 /
fp16 / fp32, optional CPU offload). `LocalEngine` is plain torch in one process: the in-process
reference that distributed runs are checked against, and the engine of a single learner with
`deepspeed.enabled: false` (no per-parameter bookkeeping: on small models that is most of a
DeepSpeed step). Like DeepSpeed's bf16 / fp16 optimizers it updates fp32 master copies of
lower-precision weights.

Both refuse an optimizer step whose gradient norm is not finite (DeepSpeed's ZeRO 1-3, bf16 and
fp16 optimizers through their overflow check, but not its plain ZeRO-0 fp32 optimizer;
LocalEngine likewise): gradients are zeroed, weights, optimizer state and LR schedule stay as
they were, and `was_step_applied()` says so. Checkpoint files are loaded with
`weights_only=True` (`load_weights_only`): loading one cannot run code.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch

from soar_ray.config import DeepSpeedConfig, OptimizerConfig
from soar_ray.errors import UnsafeCheckpointError


def lr_factor(step: int, cfg: OptimizerConfig) -> float:
    """Learning-rate multiplier after `step` optimizer steps: constant, or linear warm-up."""
    if cfg.lr_schedule == "warmup" and cfg.warmup_steps > 0:
        return min(1.0, (step + 1) / cfg.warmup_steps)
    return 1.0


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, *,
                     listen_fd: int | None, backend: str, timeout_s: float) -> None:  # fmt: skip
    """Join the learners' process group (nccl on GPU, gloo on CPU), then hand it to DeepSpeed.

    Rank 0 serves the rendezvous store on `listen_fd`, a socket it bound to `master_addr`:
    torch's env:// rendezvous would make its own server socket listen on every interface.
    """
    import deepspeed
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                          timeout=timeout, master_listen_fd=listen_fd)  # fmt: skip
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    # DeepSpeed reads the ranks from the environment and wraps the group that is already up;
    # LOCAL_RANK 0: one device per actor, Ray sets its view.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


def deepspeed_config(engine: DeepSpeedConfig, optimizer: OptimizerConfig, *,
                     micro_batch_size: int, gradient_accumulation_steps: int,
                     world_size: int) -> dict[str, Any]:  # fmt: skip
    """The DeepSpeed config dict of a learner group."""
    zero: dict[str, Any] = {
        "stage": engine.zero_stage,
        "overlap_comm": engine.overlap_comm,
        "reduce_bucket_size": engine.reduce_bucket_size,
    }
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optimizer.lr,
                "betas": list(optimizer.betas),
                "eps": optimizer.eps,
                "weight_decay": optimizer.weight_decay,
                # torch's AdamW, the same update as LocalEngine; offload uses DeepSpeedCPUAdam.
                "torch_adam": not engine.offload_optimizer,
                "adam_w_mode": True,
            },
        },  # fmt: skip
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_deepspeed_engine(module: torch.nn.Module, params: list[torch.nn.Parameter],
                           config: dict[str, Any], optimizer: OptimizerConfig):  # fmt: skip
    """A DeepSpeed engine training `params` of `module`, with the LocalEngine's LR schedule."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=params, config=config,
        lr_scheduler=partial(make_lr_scheduler, cfg=optimizer),
    )  # fmt: skip
    from soar_ray.workers.deepspeed_checkpoint import WeightsOnlyCheckpointEngine

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine.replacing(engine.checkpoint_engine)
    return engine


def load_weights_only(path: str | Path, map_location: Any = None,
                      allowed: tuple[type, ...] = ()) -> Any:  # fmt: skip
    """torch.load that rebuilds tensors, plain containers and the `allowed` classes only, so a
    planted checkpoint file cannot run code; anything else stops with one line naming the file."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the first refused Python object as "GLOBAL module.name".
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"the Python object {found.group(1)}" if found else "data weights_only refuses"
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds {what}, and checkpoints load with "
            "weights_only=True (tensors and plain data only), so soar-ray did not write this "
            "file or it was changed since; resume from another checkpoint"
        ) from None


class LocalEngine:
    """AdamW, LR schedule, gradient clipping and accumulation behind DeepSpeed's engine API.

    Weights below fp32 get fp32 master copies: the gradients are cast onto them at an optimizer
    step, AdamW updates them, and the weights are copied back rounded (an update smaller than
    half a bf16 step of a weight would otherwise be lost). AdamW is torch's fused kernel on GPUs.
    """

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimizerConfig,
                 gradient_accumulation_steps: int = 1) -> None:  # fmt: skip
        self.params, self.cfg = params, cfg
        self.master = params
        if any(p.dtype != torch.float32 for p in params):
            self.master = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True))
                           for p in params]  # fmt: skip
        fused = bool(params) and all(p.is_cuda for p in params)
        self.optimizer = torch.optim.AdamW(
            self.master, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
            fused=fused or None,
        )  # fmt: skip
        self.lr_scheduler = make_lr_scheduler(self.optimizer, cfg)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.micro_steps = 0
        self.global_steps = 0
        self._grad_norm = math.nan
        self._step_applied = False

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients; the loss is divided by the accumulation steps as DeepSpeed does."""
        (loss / self.gradient_accumulation_steps).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def step(self) -> None:
        """Clip, update and zero the gradients at an accumulation boundary; a non-finite
        gradient norm skips the update as DeepSpeed's overflow check does."""
        self._step_applied = False
        if self.is_gradient_accumulation_boundary():
            if self.master is not self.params:
                for master, param in zip(self.master, self.params, strict=True):
                    master.grad = None if param.grad is None else param.grad.float()
                    param.grad = None
            max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
            # Host sync: the norm is read back for logging once per optimizer step.
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self.master, max_norm))
            self._step_applied = math.isfinite(self._grad_norm)
            if self._step_applied:
                self.optimizer.step()
                self.lr_scheduler.step()
                self._copy_master_to_params()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1

    @torch.no_grad()
    def _copy_master_to_params(self) -> None:
        if self.master is not self.params:
            torch._foreach_copy_(self.params, self.master)

    def was_step_applied(self) -> bool:
        """Whether the last `step()` updated the weights (False between boundaries)."""
        return self._step_applied

    def get_global_grad_norm(self) -> float:
        return self._grad_norm

    def destroy(self) -> None:
        """Nothing to release (DeepSpeed's engine frees its hooks and buffers here)."""

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str | Path, tag: str, save_latest: bool = False) -> None:
        """Parameters (their fp32 masters where kept), optimizer and schedule under
        save_dir/tag (no `latest` file either way)."""
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "params": [p.detach().clone() for p in self.master],
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "micro_steps": self.micro_steps,
            "global_steps": self.global_steps,
        }
        torch.save(state, path / "local_engine.pt")

    def load_checkpoint(self, load_dir: str | Path, tag: str) -> None:
        state = load_weights_only(Path(load_dir) / tag / "local_engine.pt")
        with torch.no_grad():
            for master, saved in zip(self.master, state["params"], strict=True):
                master.copy_(saved)
        self._copy_master_to_params()
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]
