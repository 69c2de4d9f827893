"""Rollout: text -> latents -> images with the current denoiser (evaluation-style ODE sampling)."""

from __future__ import annotations

from typing import Any

import torch

from soar_ray.algo.flow import Cond, make_inference_grid, make_schedule
from soar_ray.algo.sampling import sample_ode
from soar_ray.algo.soar import SoarHyperParams, SoarInputs, prepare_soar_inputs
from soar_ray.config import SoarStage
from soar_ray.models import SD3Model
from soar_ray.workers.learner import (
    SD3_SCHEDULE_SHIFT,
    encode_batch,
    prepare_stage_model,
    soar_hyperparams,
)


@torch.no_grad()
def generate_images(
    model: SD3Model,
    prompts: list[str],
    *,
    height: int,
    width: int,
    num_steps: int,
    guidance: float,
    seed: int,
    shift: float = 3.0,
) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1]: `num_steps` Euler ODE steps with CFG, noise from `seed`."""
    factor = model.vae_scale_factor
    if height % (2 * factor) or width % (2 * factor):
        raise ValueError(
            f"height and width must be multiples of {2 * factor}, got {height}x{width}"
        )
    device = model.transformer.device
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (len(prompts), model.latent_channels, height // factor, width // factor)
    # Noise drawn on the CPU so a seed gives the same images on every device.
    noise = torch.randn(shape, generator=generator).to(device)
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
    """An inference copy of the denoiser: sample grids, and SOAR rollouts in disaggregated mode.

    Its weights carry a policy version: the number of learner updates they include.
    """

    def __init__(self, model: SD3Model, *, seed: int, uncond: Cond | None = None) -> None:
        self.model = model
        self.device = next(model.transformer.parameters()).device
        model.transformer.eval().requires_grad_(False)
        self.version = 0
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._uncond = uncond
        self._stage: tuple[SoarStage, SoarHyperParams] | None = None
        self.schedule = make_schedule(shift=SD3_SCHEDULE_SHIFT)

    def set_stage(self, stage: SoarStage, seed: int) -> None:
        """Match the learners' trainable structure (LoRA adapters) and the stage's rollout."""
        prepare_stage_model(self.model.transformer, stage, seed=seed)
        self.model.transformer.requires_grad_(False)
        self._stage = (stage, soar_hyperparams(stage))

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Copy the learners' trainable weights (by name) in; every name must exist here."""
        params = dict(self.model.transformer.named_parameters())
        missing = sorted(set(weights) - set(params))
        if missing:
            raise KeyError(f"rollout worker has no parameters {missing[:5]} (of {len(missing)})")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.version = version

    def prepare_soar(self, batch: dict[str, Any]) -> tuple[SoarInputs, int]:
        """Encode one rank's batch, then draws, CFG rollout and aux points, with this worker's
        policy version (disaggregated mode: the learner only runs the graded forward)."""
        if self._stage is None:
            raise RuntimeError("set_stage must be called before prepare_soar")
        _, hp = self._stage
        z0, cond = encode_batch(self.model, batch, self.device)
        uncond = self._uncond if self._uncond is not None else self.model.uncond(1)
        inputs = prepare_soar_inputs(
            self.model.denoise, z0, cond, {k: v.to(self.device) for k, v in uncond.items()},
            self.schedule, hp, generator=self.generator,
        )  # fmt: skip
        return inputs.to("cpu"), self.version
