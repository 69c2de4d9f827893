"""Rectified-flow primitives: schedule, time/sigma lookups, densities, weights, rollout steps.

Time convention (SPEC §0), stated once for all of soar_ray.algo:
    z_s = (1 - s) * z0 + s * z1,   z0 clean latent, z1 ~ N(0, I), s = sigma in [0, 1].
sigma 1 is pure noise, sigma 0 is clean. The model predicts the velocity v = z1 - z0, so an Euler
step from s to s' < s is z_{s'} = z_s + v * (s' - s). The denoiser sees timestep = sigma * 1000
(diffusers). The training time t in [0, 1] of the timestep density indexes the schedule grid,
t = 1 - i / N, so t = 1 is also the noise end.

Shape suffixes: B batch, C channels, H height, W width (latent space), N grid length,
P points per rollout path, n a subset of the batch. Conditioning `cond` is a dict of batch-first
tensors (for SD3: prompt_embeds [B, L, D], pooled_embeds [B, P]).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Cond = dict[str, torch.Tensor]

DENSITIES = ("logit_normal", "mode", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
ROLLOUT_KINDS = ("ode", "simple", "sde", "flow_sde", "cps")


@dataclass(frozen=True, eq=False)
class Schedule:
    """A sigma grid: sigmas [N+1] descending from 1 to a final 0, timesteps [N] = sigma * 1000."""

    sigmas: torch.Tensor
    """[N+1] float32, sigmas[0] = 1, sigmas[N] = 0."""
    timesteps: torch.Tensor
    """[N] float32, the model's timestep at each of the first N sigmas."""
    shift: float | None = None
    """The shift the grid was built with; None for a grid wrapped from raw arrays."""

    def __post_init__(self) -> None:
        if self.sigmas.ndim != 1 or self.timesteps.ndim != 1:
            raise ValueError("Schedule.sigmas and Schedule.timesteps must be 1-D")
        if self.sigmas.shape[0] != self.timesteps.shape[0] + 1:
            raise ValueError(
                f"Schedule.sigmas must hold N+1 values for N timesteps, got "
                f"{self.sigmas.shape[0]} sigmas and {self.timesteps.shape[0]} timesteps"
            )
        if float(self.sigmas[-1]) != 0.0:
            raise ValueError(f"Schedule.sigmas must end with 0, got {float(self.sigmas[-1])}")

    def to(self, device: torch.device | str) -> "Schedule":
        """The same grid with its tensors on `device` (moved once, not at every step)."""
        return Schedule(self.sigmas.to(device), self.timesteps.to(device), self.shift)

    @property
    def num_steps(self) -> int:
        """N, the number of grid points that carry a timestep."""
        return self.timesteps.shape[0]

    @property
    def sigma_max(self) -> float:
        """sigmas[1]: the stand-in for sigma = 1 in the flow-SDE std (SPEC §2, `flow_sde`)."""
        return float(self.sigmas[1])


def make_schedule(num_train_timesteps: int = 1000, shift: float = 3.0) -> Schedule:
    """Training grid of diffusers FlowMatchEulerDiscreteScheduler(N, shift), plus a final 0.

    The scheduler's training `.sigmas` hold N values (set_timesteps is never called for training;
    it would re-shift them); the appended 0 gives every grid one shape, and lookups read only the
    first N.
    """
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    # Same float32 operations as the scheduler's __init__, so the values agree bit for bit.
    steps = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float64)
    unshifted = steps.to(torch.float32).flip(0) / num_train_timesteps
    sigmas = shift * unshifted / (1 + (shift - 1) * unshifted)
    timesteps = sigmas * num_train_timesteps
    return Schedule(torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps, shift=shift)


def make_inference_grid(schedule_or_shift: Schedule | float, num_steps: int) -> Schedule:
    """Sampling grid of FlowMatchEulerDiscreteScheduler.set_timesteps(T): T+1 sigmas, T timesteps.

    schedule_or_shift: the training schedule (make_schedule) or its shift (N = 1000).
    """
    train = schedule_or_shift
    if not isinstance(train, Schedule):
        train = make_schedule(shift=float(train))
    if train.shift is None:
        raise ValueError(
            "make_inference_grid needs a Schedule built by make_schedule (shift known)"
        )
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    num_train = train.num_steps
    start = float(train.sigmas[0]) * num_train
    stop = float(train.sigmas[num_train - 1]) * num_train
    # numpy.linspace in float64 (start + i * step, last point exact), as diffusers computes it.
    if num_steps == 1:
        steps = torch.tensor([start], dtype=torch.float64)
    else:
        step = (stop - start) / (num_steps - 1)
        steps = torch.arange(num_steps, dtype=torch.float64) * step + start
        steps[-1] = stop
    unshifted = steps / num_train
    shifted = train.shift * unshifted / (1 + (train.shift - 1) * unshifted)
    sigmas = shifted.to(torch.float32)
    timesteps = sigmas * num_train
    return Schedule(torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps, shift=train.shift)


def t_to_sigma_timestep(t_B: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid sigma and timestep at training time t (SPEC §0): i = clamp(long((1 - t) N), 0, N-1)."""
    num = schedule.num_steps
    index_B = ((1.0 - t_B) * num).long().clamp(0, num - 1)
    sigmas = schedule.sigmas.to(device=t_B.device, dtype=t_B.dtype)
    return sigmas[index_B], schedule.timesteps.to(t_B.device)[index_B]


def sigma_to_t(sigma_B: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Training time of the first grid sigma <= s (SPEC §0): 1 - searchsorted(-sigmas, -s) / N."""
    num = schedule.num_steps
    grid = schedule.sigmas[:num].to(device=sigma_B.device, dtype=sigma_B.dtype)
    index_B = torch.searchsorted(-grid, -sigma_B).clamp(0, num - 1)
    return 1.0 - index_B.float() / num


def sample_t(
    batch_size: int,
    *,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t_B from the SD3 timestep density (diffusers compute_density_for_timestep_sampling)."""
    if scheme == "logit_normal":
        u = torch.normal(logit_mean, logit_std, (batch_size,), generator=generator, device=device)
        return torch.sigmoid(u)
    if scheme == "mode":
        u = torch.rand(batch_size, generator=generator, device=device)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    raise ValueError(f"timestep density scheme must be one of {DENSITIES}, got {scheme!r}")


def loss_weight(sigma_B: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weight (diffusers compute_loss_weighting_for_sd3), in fp32."""
    sigma_B = sigma_B.float()
    if scheme == "none":
        return torch.ones_like(sigma_B)
    if scheme == "sigma_sqrt":
        return sigma_B**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma_B + 2 * sigma_B**2))
    raise ValueError(f"loss weighting scheme must be one of {WEIGHTINGS}, got {scheme!r}")


def weighted_mse(
    pred_BCHW: torch.Tensor, target_BCHW: torch.Tensor, weight_B: torch.Tensor
) -> torch.Tensor:
    """Per-sample mean_CHW(w (pred - target)^2) in fp32 (SPEC §1.3); the caller reduces."""
    error = (pred_BCHW.float() - target_BCHW.float()) ** 2
    return (per_sample(weight_B, error) * error).flatten(1).mean(1)


def cfg_velocity(
    v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float | torch.Tensor
) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + g (v_cond - v_uncond)."""
    return v_uncond + guidance * (v_cond - v_uncond)


def guided_velocity(
    denoiser: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    x_BCHW: torch.Tensor,
    timestep_B: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    guidance: float,
) -> torch.Tensor:
    """CFG velocity from ONE forward on [x; x] with [uncond; cond] (SPEC §0, §1.4)."""
    both = denoiser(
        torch.cat([x_BCHW, x_BCHW]), torch.cat([timestep_B, timestep_B]), cat_cond([uncond, cond])
    )
    v_uncond, v_cond = both.chunk(2)
    return cfg_velocity(v_uncond, v_cond, guidance)


def per_sample(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] value as fp32 [B, 1, ...] (or [1, 1, ...]) broadcasting against x."""
    value = torch.as_tensor(value, dtype=torch.float32, device=x.device).reshape(-1)
    if value.numel() not in (1, x.shape[0]):
        raise ValueError(
            f"expected a scalar or {x.shape[0]} per-sample values, got {value.numel()}"
        )
    return value.view(-1, *([1] * (x.ndim - 1)))


def flow_sde_mean_std(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float,
    sigma_max: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO reverse-SDE step mean and std (SPEC §2 `flow_sde`, without the sqrt(-ds))."""
    x, v = x.float(), v.float()
    s, s_next = per_sample(sigma, x), per_sample(sigma_next, x)
    ds = s_next - s
    # sigma = 1 would divide by zero; the grid's second sigma stands in for it.
    s_safe = torch.where(s == 1, per_sample(sigma_max, x), s)
    std = noise_level * torch.sqrt(s / (1 - s_safe))
    mean = x * (1 + std**2 / (2 * s) * ds) + v * (1 + std**2 * (1 - s) / (2 * s)) * ds
    return mean, std


def cps_mean_std(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficient-preserving sampling step mean and std (SPEC §2 `cps`)."""
    x, v = x.float(), v.float()
    s, s_next = per_sample(sigma, x), per_sample(sigma_next, x)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    mean = x0_hat * (1 - s_next) + x1_hat * torch.sqrt((s_next**2 - std**2).clamp_min(0))
    return mean, std


def standard_normal(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 N(0, I) shaped like `like`; same draws as randn_like(like.float()) without generator."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device).to(like.device)


def rollout_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    kind: str,
    noise_scale: float,
    sigma_max: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One rollout step from sigma to sigma_next of the given kind (SPEC §2); fp32 inside."""
    if kind not in ROLLOUT_KINDS:
        raise ValueError(f"rollout kind must be one of {ROLLOUT_KINDS}, got {kind!r}")
    xf, vf = x.float(), v.float()
    s, s_next = per_sample(sigma, xf), per_sample(sigma_next, xf)
    ds = s_next - s
    if kind == "ode":
        return (xf + vf * ds).to(x.dtype)
    if noise is None:
        noise = standard_normal(xf, generator)
    elif noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(x.shape)}")
    noise = noise.float()
    if kind == "simple":
        out = xf + vf * ds + noise_scale * torch.sqrt(ds.abs()) * noise
    elif kind == "sde":
        # The `sde` kind re-noises the predicted clean latent; noise_scale plays no part.
        out = (1 - s_next) * (xf - s * vf) + s_next * noise
    elif kind == "flow_sde":
        mean, std = flow_sde_mean_std(
            xf, vf, s, s_next, noise_level=noise_scale, sigma_max=sigma_max
        )
        out = mean + std * torch.sqrt((-ds).clamp_min(0)) * noise
    else:
        mean, std = cps_mean_std(xf, vf, s, s_next, noise_level=noise_scale)
        out = mean + std * noise
    return out.to(x.dtype)


def cond_to(cond: Cond, device: torch.device | str) -> Cond:
    """Every conditioning tensor on `device` (no copy for those already there)."""
    return {name: value.to(device) for name, value in cond.items()}


def index_cond(cond: Cond, index: torch.Tensor) -> Cond:
    """The rows `index` of every conditioning tensor."""
    return {name: value[index] for name, value in cond.items()}


def cat_cond(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch; all must carry the same keys."""
    if not conds:
        raise ValueError("cat_cond needs at least one conditioning")
    keys = set(conds[0])
    for position, cond in enumerate(conds):
        if set(cond) != keys:
            raise ValueError(
                f"cat_cond: conditioning {position} has keys {sorted(cond)}, "
                f"expected {sorted(keys)}"
            )
    return {name: torch.cat([cond[name] for cond in conds]) for name in conds[0]}


def repeat_cond(cond: Cond, num_repeats: int) -> Cond:
    """Repeat every sample num_repeats times in a row (sample i -> rows i*n ... i*n + n - 1)."""
    return {name: value.repeat_interleave(num_repeats, dim=0) for name, value in cond.items()}


def cond_batch_size(cond: Cond) -> int:
    """The shared batch size of a conditioning; raises when the tensors disagree."""
    sizes = {name: value.shape[0] for name, value in cond.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"conditioning tensors must share one batch size, got {sizes}")
    return next(iter(sizes.values()))
