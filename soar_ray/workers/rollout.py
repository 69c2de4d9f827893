"""Rollout workers: inference copies of the denoiser that sample images and the stage's rollouts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soar_ray.algo.flow import Cond, cond_to, make_inference_grid
from soar_ray.algo.sampling import sample_ode
from soar_ray.config import JobConfig
from soar_ray.metrics import to_uint8_images
from soar_ray.models import SD3Model, trainable_parameters
from soar_ray.models.build import load_transformer
from soar_ray.models.sd3 import SD3_SCHEDULE_SHIFT, compile_blocks, move
from soar_ray.workers.grpo import GrpoRollout
from soar_ray.workers.soar import SoarRollout
from soar_ray.workers.weight_transfer import WeightGroup, spec_of


@torch.no_grad()
def generate_images(
    model: SD3Model,
    prompts: list[str],
    *,
    height: int,
    width: int,
    num_steps: int,
    guidance: float,
    seeds: Sequence[int],
    shift: float = SD3_SCHEDULE_SHIFT,
) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1]: `num_steps` Euler ODE steps with CFG; image i starts from
    the noise of `seeds[i]`, so an image does not depend on the batch it was made in."""
    factor = model.vae_scale_factor
    if height % (2 * factor) or width % (2 * factor):
        raise ValueError(
            f"height and width must be multiples of {2 * factor}, got {height}x{width}"
        )
    if len(seeds) != len(prompts):
        raise ValueError(f"generate_images: {len(seeds)} seeds for {len(prompts)} prompts")
    device = model.transformer.device
    shape = (model.latent_channels, height // factor, width // factor)
    # Noise drawn on the CPU so a seed gives the same images on every device.
    noise = torch.stack(
        [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    ).to(device)
    cond = model.encode_prompts(prompts)
    uncond = model.uncond(len(prompts))
    grid = make_inference_grid(shift, num_steps)
    was_training = model.transformer.training
    model.transformer.eval()
    try:
        latents = sample_ode(model.denoise, noise, grid, cond, uncond, guidance)
    finally:
        model.transformer.train(was_training)
    return model.decode_latents(latents)


class RolloutWorker:
    """An inference copy of the denoiser: sample grids, evaluation images, and the stage's
    rollouts (`SoarRollout` aux points, `GrpoRollout` SDE trajectories).

    Its weights carry a policy version: the number of learner updates they include. Worker
    `index` is rank `index + 1` of the weight group (learner rank 0 is rank 0).
    """

    def __init__(self, job: JobConfig, model: SD3Model, *, seed: int,
                 uncond: Cond | None = None, index: int = 0) -> None:  # fmt: skip
        self.job, self.model, self.index = job, model, index
        self.device = next(model.transformer.parameters()).device
        self.resolution = job.model.resolution
        model.transformer.eval().requires_grad_(False)
        self.version = 0
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # The latent cache's encoding of "" goes to the device once, not at every step.
        self._uncond = None if uncond is None else cond_to(uncond, self.device)
        self.step: SoarRollout | GrpoRollout | None = None
        self.trainable: list[str] = []
        """Names of the parameters the learners train in this stage: what a push sends."""
        self.weight_group: WeightGroup | None = None

    def uncond(self) -> Cond:
        """Encoding of "" on this worker's device (from the latent cache when training from one)."""
        uncond = self._uncond if self._uncond is not None else self.model.uncond(1)
        return cond_to(uncond, self.device)

    def set_stage(self, stage_index: int, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Start a stage: take the finished stage's full weights (when given), then match the
        learners' trainable structure (LoRA adapters) and build the stage's rollout."""
        from soar_ray.workers.learner import prepare_stage_model

        stage = self.job.stages[stage_index]
        transformer = self.model.transformer
        if weights is not None:
            transformer = type(transformer).from_config(transformer.config)
            move(transformer, self.device, next(iter(weights.values())).dtype)
            transformer.load_state_dict(weights)
        prepare_stage_model(transformer, stage, seed=self.job.seed)
        self.trainable = [name for name, _ in trainable_parameters(transformer)]
        self._hold(transformer)
        self.step = ROLLOUTS[stage.algorithm](self, stage)

    def _hold(self, transformer: torch.nn.Module) -> None:
        """Make `transformer` this worker's inference copy: eval, no grad, its blocks compiled
        when `cluster.compile_rollout_blocks` says so."""
        self.model.transformer = transformer.eval().requires_grad_(False)
        if self.job.cluster.compile_rollout_blocks:
            compile_blocks(transformer, "cluster.compile_rollout_blocks")

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        """Copy the learners' trainable weights (by name) in; every name must exist here."""
        params = dict(self.model.transformer.named_parameters())
        missing = sorted(set(weights) - set(params))
        if missing:
            raise KeyError(f"rollout worker has no parameters {missing[:5]} (of {len(missing)})")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.version = version
        return version

    def join_weight_group(self, host: str, port: int, size: int, binds: list[str],
                          timeout_s: float, op_timeout_s: float) -> None:  # fmt: skip
        """(Re)join the weight group at rank 0's store `host:port` as rank `index + 1`, its
        traffic bound to `binds[rank]` (see `WeightGroup.join`)."""
        self.leave_weight_group()
        rank = self.index + 1
        self.weight_group = WeightGroup.join(
            host, port, rank, size, self.device, bind=binds[rank], timeout_s=timeout_s,
            op_timeout_s=op_timeout_s,
        )  # fmt: skip

    def leave_weight_group(self) -> None:
        """Close this worker's side of the weight group (members waiting on it fail)."""
        if self.weight_group is not None:
            self.weight_group.close()
            self.weight_group = None

    def receive_weights(self, version: int) -> int:
        """Take one push of the learners' trainable weights from the weight group (the
        collective `load_weights`); a push of other names, shapes or dtypes than this stage
        trains is refused, naming the first differing parameter."""
        if self.step is None or self.weight_group is None:
            raise RuntimeError("set_stage and join_weight_group must come before receive_weights")
        params = dict(self.model.transformer.named_parameters())
        held = spec_of([(name, params[name]) for name in self.trainable])
        self.weight_group.receive(params, held)
        self.version = version
        return version

    def load_transformer(self, path: str | Path) -> None:
        """Replace the weights by a diffusers transformer folder (evaluating a saved model)."""
        dtype = next(self.model.transformer.parameters()).dtype
        self._hold(load_transformer(path, self.device, dtype))

    def rollout(self, request: Any) -> tuple:
        """The stage's rollout of one request (a batch for SOAR, prompts for GRPO)."""
        if self.step is None:
            raise RuntimeError("set_stage must be called before rollout")
        return self.step.rollout(request)

    def generate_images(self, prompts: list[str], **kwargs: Any) -> np.ndarray:
        """uint8 images [B, H, W, 3]: ODE sampling with CFG (see `generate_images`)."""
        return to_uint8_images(generate_images(self.model, prompts, **kwargs))


ROLLOUTS: dict[str, type[SoarRollout] | type[GrpoRollout]] = {
    "soar": SoarRollout,
    "grpo": GrpoRollout,
}
"""stage.algorithm -> the rollout-side step of that algorithm."""
