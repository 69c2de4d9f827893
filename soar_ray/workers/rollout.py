"""Rollout: text -> latents -> images with the current denoiser (evaluation-style ODE sampling)."""

from __future__ import annotations

import torch

from soar_ray.algo.flow import make_inference_grid
from soar_ray.algo.sampling import sample_ode
from soar_ray.models import SD3Model


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
