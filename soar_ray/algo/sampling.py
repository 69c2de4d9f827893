"""Samplers over the denoiser contract (rectified flow, sigma 1 = noise; see flow.py).

Every sampler has the same signature (k-diffusion style): it takes the initial noise, the
inference grid and the conditioning and returns the final latents.
"""

import torch

from soar_ray.algo.flow import Cond, Schedule, guided_velocity


@torch.no_grad()
def sample_ode(
    denoiser, noise_BCHW: torch.Tensor, grid: Schedule, cond: Cond, uncond: Cond, guidance: float
) -> torch.Tensor:
    """Euler ODE sampling z_{s'} = z_s + v (s' - s) over `grid` (e.g. make_inference_grid(3.0, 40))."""
    x = noise_BCHW
    batch_size = x.shape[0]
    # The grid reaches the device once: a copy per step would wait for the step before.
    timesteps = grid.timesteps.to(x.device, x.dtype)
    for i in range(grid.num_steps):
        sigma, sigma_next = grid.sigmas[i].item(), grid.sigmas[i + 1].item()
        timestep_B = timesteps[i].expand(batch_size)
        v = guided_velocity(denoiser, x, timestep_B, cond, uncond, guidance)
        # Euler update in fp32 so a bf16 model does not accumulate rounding over 40 steps.
        x = (x.float() + v.float() * (sigma_next - sigma)).to(noise_BCHW.dtype)
    return x
