"""Flow-GRPO math: SDE step with log-prob, group advantages, clipped policy loss + KL (SPEC §3).

Flow-GRPO paper (arXiv 2505.05470): the ODE sampler is turned into an SDE with the same marginals,
so every denoising step is a Gaussian policy whose log-probability PPO-style clipping can use.
"""

import math
from dataclasses import dataclass

import torch

from soar_ray.algo.flow import cps_mean_std, flow_sde_mean_std, per_sample, standard_normal

SDE_KINDS = ("flow_sde", "cps")


def sde_step_with_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    sde_kind: str = "flow_sde",
    sigma_max: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SDE step and its Gaussian log-prob (SPEC §3): (x', log_prob_B, mean, std), all fp32.

    Without `prev_sample` the step samples x' with `noise` (a standard normal draw shaped like x)
    or, without it, a draw from `generator`.

    `std` is the flow_sde std without sqrt(-ds) (the KL's scale) or the cps std. `sigma_max`
    stands in for sigma = 1 in flow_sde; None takes sigma_next, which on a sampling grid is
    exactly the grid's sigmas[1] whenever sigma = 1 (the first step).
    """
    if sde_kind == "flow_sde":
        sigma_max = sigma_next if sigma_max is None else sigma_max
        mean, std = flow_sde_mean_std(
            x, v, sigma, sigma_next, noise_level=noise_level, sigma_max=sigma_max
        )
        std_t = std * torch.sqrt(per_sample(sigma, x) - per_sample(sigma_next, x))
    elif sde_kind == "cps":
        mean, std = cps_mean_std(x, v, sigma, sigma_next, noise_level=noise_level)
        std_t = std
    else:
        raise ValueError(f"SDE kind must be one of {SDE_KINDS}, got {sde_kind!r}")
    if prev_sample is None:
        if noise is None:
            noise = standard_normal(mean, generator)
        prev_sample = mean + std_t * noise
    elif prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != {tuple(x.shape)}")
    prev_sample = prev_sample.float()
    error = prev_sample.detach() - mean
    if sde_kind == "flow_sde":
        log_norm = torch.log(std_t) + math.log(math.sqrt(2 * math.pi))
        log_density = -(error**2) / (2 * std_t**2) - log_norm
    else:
        # cps keeps only the data-dependent term; the constants cancel in the ratio.
        log_density = -(error**2)
    return prev_sample, log_density.flatten(1).mean(1), mean, std


def group_advantages(
    rewards_N: torch.Tensor,
    prompt_ids_N: torch.Tensor,
    *,
    global_std: bool = True,
    adv_clip_max: float = 5.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt normalised advantages and the keep-mask of groups not all zero (SPEC §3).

    A = clip((r - mean_prompt) / (std + eps), +-adv_clip_max), std (population) over all rewards
    when global_std, else over the prompt's group. prompt_ids_N: integer group id per sample.
    Computed in float64 like the reference, returned in the rewards' dtype.
    """
    if rewards_N.ndim != 1 or rewards_N.numel() == 0 or prompt_ids_N.shape != rewards_N.shape:
        raise ValueError(
            f"rewards {tuple(rewards_N.shape)} and prompt_ids {tuple(prompt_ids_N.shape)} "
            "must be 1-D, non-empty and of one length"
        )
    if not torch.isfinite(rewards_N).all():
        raise ValueError("rewards contain NaN or inf")
    rewards = rewards_N.double()
    _, group_N = torch.unique(prompt_ids_N, return_inverse=True)
    num_groups = int(group_N.max()) + 1  # host sync: the group count sizes the buffers
    count_G = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    count_G.index_add_(0, group_N, torch.ones_like(rewards))
    mean_G = torch.zeros_like(count_G).index_add_(0, group_N, rewards) / count_G
    centred_N = rewards - mean_G[group_N]
    if global_std:
        std_N = rewards.std(correction=0).expand_as(rewards)
    else:
        var_G = torch.zeros_like(count_G).index_add_(0, group_N, centred_N**2) / count_G
        std_N = var_G.sqrt()[group_N]
    advantages_N = (centred_N / (std_N + eps)).clamp(-adv_clip_max, adv_clip_max)
    nonzero_G = torch.zeros_like(count_G).index_add_(0, group_N, (advantages_N != 0).double())
    keep_N = nonzero_G[group_N] > 0
    return advantages_N.to(rewards_N.dtype), keep_N


@dataclass(frozen=True)
class GrpoLossTerms:
    """Per-sample pieces of the Flow-GRPO loss for one denoising step (SPEC §3)."""

    policy_B: torch.Tensor
    """Clipped surrogate max(-A r, -A clip(r, 1 - eps, 1 + eps))."""
    kl_B: torch.Tensor
    """mean_CHW((mean_theta - mean_ref)^2) / (2 std^2); zeros without a reference."""
    beta: float
    """KL weight."""
    approx_kl_B: torch.Tensor
    """0.5 (logp_new - logp_old)^2, detached."""
    clipped_B: torch.Tensor
    """1.0 where |r - 1| > clip_range, detached."""


def grpo_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    mean_theta: torch.Tensor | None = None,
    mean_ref: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    beta: float = 0.0,
) -> GrpoLossTerms:
    """PPO-clipped policy loss and reference KL per sample (SPEC §3); reduce_grpo_loss sums up."""
    if not (logp_new.shape == logp_old.shape == advantages.shape) or logp_new.ndim != 1:
        raise ValueError(
            f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and advantages "
            f"{tuple(advantages.shape)} must be [B]"
        )
    have_ref = [t is not None for t in (mean_theta, mean_ref, std)]
    if any(have_ref) and not all(have_ref):
        raise ValueError("mean_theta, mean_ref and std must be given together")
    if beta > 0 and not all(have_ref):
        raise ValueError(f"beta = {beta} > 0 needs mean_theta, mean_ref and std")
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    if all(have_ref):
        squared = ((mean_theta.float() - mean_ref.float()) ** 2).flatten(1).mean(1)
        kl_B = squared / (2 * std.float().reshape(-1) ** 2)
    else:
        kl_B = torch.zeros_like(ratio)
    return GrpoLossTerms(
        policy_B=torch.maximum(unclipped, clipped),
        kl_B=kl_B,
        beta=beta,
        approx_kl_B=0.5 * log_ratio.detach() ** 2,
        clipped_B=((ratio.detach() - 1.0).abs() > clip_range).float(),
    )


def reduce_grpo_loss(terms: GrpoLossTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = mean(policy) + beta mean(KL), and detached batch means for logging."""
    policy = terms.policy_B.mean()
    kl = terms.kl_B.mean()
    metrics = {
        "policy_loss": policy.detach(),
        "kl": kl.detach(),
        "approx_kl": terms.approx_kl_B.mean(),
        "clip_fraction": terms.clipped_B.mean(),
    }
    return policy + terms.beta * kl, metrics
