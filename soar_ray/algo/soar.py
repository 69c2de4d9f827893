"""SOAR: self-correction on the model's own one-step rollout (arXiv 2604.12617; SPEC §1).

The training step draws a noisy state z_t0, rolls it one sampler step forward with the current
model's CFG velocity (no gradient), re-noises the result toward the same noise endpoint z1 and
supervises the denoiser there with the analytic correction target v_corr = (z' - z0) / s'.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from soar_ray.algo.flow import (
    DENSITIES,
    ROLLOUT_KINDS,
    WEIGHTINGS,
    Cond,
    Schedule,
    cat_cond,
    cond_batch_size,
    cond_to,
    guided_velocity,
    index_cond,
    loss_weight,
    per_sample,
    repeat_cond,
    rollout_step,
    sample_t,
    sigma_to_t,
    t_to_sigma_timestep,
    weighted_mse,
)

AUX_EVALS = ("fused", "sequential")

Denoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
"""denoiser(x_BCHW, timestep_B, cond) -> v_BCHW, timestep = sigma * 1000."""


@dataclass(frozen=True)
class SoarHyperParams:
    """Hyper-parameters of one SOAR step; defaults are the reference run's (SPEC §1)."""

    lambda_aux: float = 1.0
    """Weight of the auxiliary correction loss; 0 gives plain flow-matching SFT."""
    num_rollout_paths: int = 1
    """M: the ODE path plus M - 1 stochastic paths."""
    trajectory_length: int = 6
    """P: re-noised points per rollout path; 0 gives plain flow-matching SFT."""
    rollout_kind: str = "flow_sde"
    """Step kind of the stochastic paths (SPEC §2)."""
    noise_scale: float = 0.5
    """eta of the stochastic paths."""
    cfg_scale_sampling: float = 4.5
    """Guidance of the rollout velocity."""
    num_sampling_steps: int = 40
    """K: the rollout advances training time by 1 / K."""
    cond_dropout_rate: float = 0.0
    """Probability that the whole batch trains on the unconditional embeddings."""
    timestep_density: str = "logit_normal"
    """Density of t0: logit_normal, mode or uniform."""
    logit_mean: float = 0.0
    """Mean of the logit-normal density."""
    logit_std: float = 1.0
    """Std of the logit-normal density."""
    mode_scale: float = 1.29
    """Scale of the mode density."""
    weighting_scheme: str = "none"
    """Per-sigma loss weight: none, sigma_sqrt or cosmap (the reference's logit_normal is none)."""
    sigma_upper_ratio: float | None = None
    """None: re-noise up to sigma 1 (the reference); else up to min(ratio * s0, 1)."""
    aux_eval: str = "fused"
    """`fused`: one batched forward for main and auxiliary points; `sequential`: one by one."""

    def __post_init__(self) -> None:
        checks = {
            "lambda_aux": self.lambda_aux >= 0,
            "num_rollout_paths": self.num_rollout_paths >= 1,
            "trajectory_length": self.trajectory_length >= 0,
            "rollout_kind": self.rollout_kind in ROLLOUT_KINDS,
            "noise_scale": self.noise_scale >= 0,
            "num_sampling_steps": self.num_sampling_steps >= 1,
            "cond_dropout_rate": 0 <= self.cond_dropout_rate <= 1,
            "timestep_density": self.timestep_density in DENSITIES,
            "logit_std": self.logit_std > 0,
            "weighting_scheme": self.weighting_scheme in WEIGHTINGS,
            "aux_eval": self.aux_eval in AUX_EVALS,
            "sigma_upper_ratio": self.sigma_upper_ratio is None or self.sigma_upper_ratio > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SoarHyperParams.{name} is invalid: {getattr(self, name)!r}")


@dataclass(frozen=True)
class AuxPoint:
    """One re-noised point for a subset of the batch (SPEC §1.5)."""

    indices: torch.Tensor
    """long [n]: the batch samples this point belongs to."""
    latents: torch.Tensor
    """[n, C, H, W]: z' on the segment from the rollout state to z1."""
    sigmas: torch.Tensor
    """[n]: the exact s' the loss uses."""
    timesteps: torch.Tensor
    """[n]: the grid timestep the model sees, t_to_sigma_timestep(sigma_to_t(s'))."""


def correction_target(point: AuxPoint, z0_BCHW: torch.Tensor) -> torch.Tensor:
    """v_corr = (z' - z0) / s' for the point's samples (SPEC §1.5), in fp32."""
    z0 = z0_BCHW[point.indices].float()
    return (point.latents.float() - z0) / per_sample(point.sigmas, z0)


def _gen_device(
    generator: torch.Generator | None, default: torch.device | str = "cpu"
) -> torch.device | str:
    """Where a draw happens: on the generator's device, else where the reference draws it."""
    return generator.device if generator is not None else default


def _uniform(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """U[0, 1) in like's dtype; without a generator the same draws as torch.rand on its device."""
    device = _gen_device(generator, like.device)
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _renoised_points(
    indices: torch.Tensor,
    z1p: torch.Tensor,
    z1: torch.Tensor,
    s1: torch.Tensor,
    s_up: torch.Tensor,
    grid: Schedule,
    num_points: int,
    generator: torch.Generator | None,
) -> list[AuxPoint]:
    """P points z' = (1 - a) z1p + a z1 at s' ~ U[s1, s_up], one rand(P, n) draw."""
    r_Pn = _uniform((num_points, indices.shape[0]), s1, generator)
    s_prime_Pn = s1 + r_Pn * (s_up - s1)
    alpha_Pn = ((s_prime_Pn - s1) / (1 - s1).clamp_min(1e-8)).clamp(0, 1)
    points = []
    for s_prime, alpha in zip(s_prime_Pn, alpha_Pn):
        a = per_sample(alpha, z1p)
        latents = ((1 - a) * z1p.float() + a * z1.float()).to(z1p.dtype)
        _, timesteps = t_to_sigma_timestep(sigma_to_t(s_prime, grid), grid)
        points.append(AuxPoint(indices, latents, s_prime, timesteps))
    return points


@torch.no_grad()
def build_aux_points(
    z_t0: torch.Tensor,
    t0: torch.Tensor,
    v_cfg: torch.Tensor,
    z1: torch.Tensor,
    *,
    num_paths: int,
    points_per_path: int,
    schedule: Schedule,
    num_sampling_steps: int,
    rollout_kind: str = "flow_sde",
    noise_scale: float = 0.5,
    sigma_upper_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> list[AuxPoint]:
    """Auxiliary points of SPEC §1.5, in the reference's order and random-draw order.

    Order: the ODE path's P points (all samples), then per stochastic path its rollout noise and
    its P points (samples with t1 > 0), on the training grid `schedule` (on z_t0's device: then no
    lookup copies it there).
    """
    if num_paths < 1 or points_per_path < 0 or num_sampling_steps < 1:
        raise ValueError(
            f"need num_paths >= 1, points_per_path >= 0, num_sampling_steps >= 1; got "
            f"{num_paths}, {points_per_path}, {num_sampling_steps}"
        )
    if not (z_t0.shape == v_cfg.shape == z1.shape) or t0.shape != (z_t0.shape[0],):
        raise ValueError(
            f"shape mismatch: z_t0 {tuple(z_t0.shape)}, v_cfg {tuple(v_cfg.shape)}, "
            f"z1 {tuple(z1.shape)}, t0 {tuple(t0.shape)}"
        )
    if points_per_path == 0:
        return []
    s0, _ = t_to_sigma_timestep(t0, schedule)
    t1 = (t0 - 1.0 / num_sampling_steps).clamp_min(0.0)
    s1, _ = t_to_sigma_timestep(t1, schedule)
    if sigma_upper_ratio is None:
        s_up = torch.ones_like(s0)
    else:
        s_up = (sigma_upper_ratio * s0).clamp_max(1.0)
    # sigmas[1] as a tensor: no read-back (Schedule.sigma_max is its float).
    step = {"noise_scale": noise_scale, "sigma_max": schedule.sigmas[1]}
    z1p = rollout_step(z_t0, v_cfg, s0, s1, kind="ode", **step)
    everyone = torch.arange(z_t0.shape[0], device=z_t0.device)
    points = _renoised_points(everyone, z1p, z1, s1, s_up, schedule, points_per_path, generator)
    if num_paths == 1:
        return points
    # Host sync: the stochastic subset's size decides the shapes below.
    active = (t1 > 0).nonzero().squeeze(1)
    if active.numel() == 0:
        return points
    for _ in range(num_paths - 1):
        z1p_path = rollout_step(
            z_t0[active], v_cfg[active], s0[active], s1[active],
            kind=rollout_kind, generator=generator, **step,
        )  # fmt: skip
        points += _renoised_points(
            active, z1p_path, z1[active], s1[active], s_up[active], schedule, points_per_path,
            generator,
        )  # fmt: skip
    return points


@dataclass
class SoarLosses:
    """Per-sample losses of one SOAR step on one rank, before reduction (SPEC §1.3, §1.5)."""

    main_B: torch.Tensor
    """[B] main flow-matching loss per sample."""
    aux: list[torch.Tensor]
    """Per auxiliary point, [n] loss per sample; NOT yet multiplied by lambda_aux."""
    num_main: int
    """Main points on this rank (B)."""
    num_aux: int
    """Auxiliary (point, sample) pairs on this rank."""
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalars for logging (no host sync until the caller reads them)."""

    def sum_main(self) -> torch.Tensor:
        """Sum of the main losses over this rank's samples."""
        return self.main_B.sum()

    def sum_aux(self) -> torch.Tensor:
        """Sum of the auxiliary losses over this rank's points, without lambda_aux."""
        return sum((loss.sum() for loss in self.aux), self.main_B.new_zeros(()))


def normalize_soar_loss(
    sum_main: torch.Tensor,
    sum_aux: torch.Tensor,
    num_main_global: int | torch.Tensor,
    num_aux_global: int | torch.Tensor,
    lambda_aux: float,
    world_size: int,
) -> torch.Tensor:
    """(sum_main + lambda sum_aux) / max(N_main + lambda N_aux, 1) * world_size (SPEC §1.6).

    The counts are summed over all data-parallel ranks; the world_size factor undoes the
    engine's gradient average, so the update is the global per-point mean.
    """
    count = num_main_global + lambda_aux * num_aux_global
    count = count.clamp_min(1.0) if isinstance(count, torch.Tensor) else max(count, 1.0)
    return (sum_main + lambda_aux * sum_aux) / count * world_size


def _draw_step_inputs(
    z0: torch.Tensor,
    hp: SoarHyperParams,
    generator: torch.Generator | None,
    z1: torch.Tensor | None,
    t0: torch.Tensor | None,
    drop_cond: bool | None,
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """Cond-dropout flag, noise z1 and time t0, drawn in the reference's order unless given."""
    if drop_cond is None:
        # The reference draws this from Python's `random`; drawing from torch only when the
        # rate is positive keeps the torch stream identical to the reference at rate 0.
        drop_cond = False
        if hp.cond_dropout_rate > 0:
            u = torch.rand((), generator=generator, device=_gen_device(generator))
            drop_cond = bool(u < hp.cond_dropout_rate)
    if z1 is None:
        z1 = torch.randn(
            z0.shape, generator=generator, dtype=z0.dtype, device=_gen_device(generator, z0.device)
        ).to(z0.device)
    if t0 is None:
        # Drawn on the CPU like diffusers' density sampler, then moved.
        t0 = sample_t(
            z0.shape[0], scheme=hp.timestep_density, logit_mean=hp.logit_mean,
            logit_std=hp.logit_std, mode_scale=hp.mode_scale, generator=generator,
            device=_gen_device(generator),
        ).to(z0.device)  # fmt: skip
    if z1.shape != z0.shape or t0.shape != (z0.shape[0],):
        raise ValueError(
            f"z1 {tuple(z1.shape)} / t0 {tuple(t0.shape)} do not fit z0 {tuple(z0.shape)}"
        )
    return drop_cond, z1, t0


def _batched_uncond(uncond: Cond, batch_size: int) -> Cond:
    """uncond of batch 1 (the encoding of "") repeated to the batch, or already of batch B."""
    size = cond_batch_size(uncond)
    if size == 1:
        return repeat_cond(uncond, batch_size)
    if size != batch_size:
        raise ValueError(f"uncond batch must be 1 or {batch_size}, got {size}")
    return uncond


@dataclass
class SoarInputs:
    """Everything the graded SOAR forward needs, drawn and rolled out without gradient.

    A rollout worker can build it with a policy a few versions old (disaggregated mode); the
    learner then only runs `soar_losses_from_inputs`.
    """

    z0: torch.Tensor
    """[B, C, H, W] clean latents."""
    cond: Cond
    """Conditioning of the main and auxiliary points (uncond where the batch was dropped)."""
    z1: torch.Tensor
    """[B, C, H, W] noise endpoint shared by z_t0 and every re-noised point."""
    t0: torch.Tensor
    """[B] training time of the main point."""
    drop_cond: bool
    """Whether cond dropout replaced the batch's conditioning by uncond."""
    points: list[AuxPoint]
    """Auxiliary points in reference order (empty for SFT)."""

    def to(self, device: torch.device | str) -> "SoarInputs":
        """The same inputs on `device` (points included)."""
        points = [
            AuxPoint(p.indices.to(device), p.latents.to(device), p.sigmas.to(device),
                     p.timesteps.to(device))
            for p in self.points
        ]  # fmt: skip
        return SoarInputs(
            self.z0.to(device), cond_to(self.cond, device),
            self.z1.to(device), self.t0.to(device), self.drop_cond, points,
        )  # fmt: skip


@torch.no_grad()
def prepare_soar_inputs(
    denoiser: Denoiser,
    z0: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    schedule: Schedule,
    hp: SoarHyperParams,
    *,
    generator: torch.Generator | None = None,
    z1: torch.Tensor | None = None,
    t0: torch.Tensor | None = None,
    drop_cond: bool | None = None,
) -> SoarInputs:
    """Steps 1, 2, 4 and 5 of SPEC §1: draws, cond dropout, the no-grad CFG rollout, aux points.

    Draws (unless given): cond dropout, z1, t0, then the auxiliary points' draws; with no
    generator they come from the global RNG in the reference's order.
    """
    num_batch = z0.shape[0]
    if cond_batch_size(cond) != num_batch:
        raise ValueError(f"cond batch {cond_batch_size(cond)} != latent batch {num_batch}")
    uncond = _batched_uncond(uncond, num_batch)
    drop_cond, z1, t0 = _draw_step_inputs(z0, hp, generator, z1, t0, drop_cond)
    if drop_cond:
        cond = uncond
    points: list[AuxPoint] = []
    if hp.lambda_aux > 0 and hp.trajectory_length > 0:
        s0, ts0 = t_to_sigma_timestep(t0, schedule)
        z_t0 = _noised(z0, z1, s0)
        v_cfg = guided_velocity(denoiser, z_t0, ts0, cond, uncond, hp.cfg_scale_sampling)
        points = build_aux_points(
            z_t0, t0, v_cfg, z1, num_paths=hp.num_rollout_paths,
            points_per_path=hp.trajectory_length, schedule=schedule,
            num_sampling_steps=hp.num_sampling_steps,
            rollout_kind=hp.rollout_kind, noise_scale=hp.noise_scale,
            sigma_upper_ratio=hp.sigma_upper_ratio, generator=generator,
        )  # fmt: skip
    return SoarInputs(z0, cond, z1, t0, drop_cond, points)


def _noised(z0: torch.Tensor, z1: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """z_t0 = (1 - s0) z0 + s0 z1."""
    s = per_sample(s0, z0).to(z0.dtype)
    return (1 - s) * z0 + s * z1


def soar_losses_from_inputs(
    denoiser: Denoiser, inputs: SoarInputs, schedule: Schedule, hp: SoarHyperParams
) -> SoarLosses:
    """Step 3 and the auxiliary losses of SPEC §1.5: the graded forward(s), per sample."""
    z0, z1, cond, points = inputs.z0, inputs.z1, inputs.cond, inputs.points
    s0, ts0 = t_to_sigma_timestep(inputs.t0, schedule)
    z_t0 = _noised(z0, z1, s0)
    target_main = z1.float() - z0.float()
    items = [(z_t0, ts0, cond)]
    items += [(p.latents, p.timesteps, index_cond(cond, p.indices)) for p in points]
    predictions = _predict(denoiser, items, hp.aux_eval == "fused")

    main_B = weighted_mse(predictions[0], target_main, loss_weight(s0, hp.weighting_scheme))
    aux = [
        weighted_mse(v, correction_target(p, z0), loss_weight(p.sigmas, hp.weighting_scheme))
        for v, p in zip(predictions[1:], points)
    ]
    losses = SoarLosses(main_B, aux, z0.shape[0], sum(p.indices.numel() for p in points))
    losses.diagnostics = _diagnostics(losses, s0, points, inputs.drop_cond)
    return losses


def soar_losses(
    denoiser: Denoiser,
    z0: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    schedule: Schedule,
    hp: SoarHyperParams,
    *,
    generator: torch.Generator | None = None,
    z1: torch.Tensor | None = None,
    t0: torch.Tensor | None = None,
    drop_cond: bool | None = None,
) -> SoarLosses:
    """Steps 1-5 of the SOAR training step (SPEC §1) on one rank's batch z0 [B, C, H, W]."""
    inputs = prepare_soar_inputs(
        denoiser, z0, cond, uncond, schedule, hp, generator=generator, z1=z1, t0=t0,
        drop_cond=drop_cond,
    )  # fmt: skip
    return soar_losses_from_inputs(denoiser, inputs, schedule, hp)


def _predict(
    denoiser: Denoiser, inputs: list[tuple[torch.Tensor, torch.Tensor, Cond]], fused: bool
) -> list[torch.Tensor]:
    """Velocities for each (latents, timesteps, cond): one batched forward, or one per item."""
    if not fused:
        return [denoiser(*item) for item in inputs]
    latents, timesteps, conds = zip(*inputs)
    v_all = denoiser(torch.cat(latents), torch.cat(timesteps), cat_cond(conds))
    return list(v_all.split([x.shape[0] for x in latents]))


def _diagnostics(
    losses: SoarLosses, s0: torch.Tensor, points: list[AuxPoint], drop_cond: bool
) -> dict[str, torch.Tensor]:
    """Detached means for logging: losses, sigmas, points per sample, cond dropout."""
    zero = s0.new_zeros(())
    aux_sigmas = torch.cat([p.sigmas for p in points]) if points else zero[None]
    return {
        "loss_main": losses.main_B.detach().mean(),
        "loss_aux": losses.sum_aux().detach() / max(losses.num_aux, 1),
        "sigma_main_mean": s0.detach().float().mean(),
        "sigma_aux_mean": aux_sigmas.detach().float().mean(),
        "aux_points_per_sample": zero + losses.num_aux / max(losses.num_main, 1),
        "cond_dropped": zero + float(drop_cond),
    }
