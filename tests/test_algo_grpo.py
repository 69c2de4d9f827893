"""Flow-GRPO math (SPEC §3) against torch.distributions and hand computations."""

import math

import pytest
import torch
from torch.distributions import Normal

from soar_ray.algo.grpo import (
    group_advantages,
    grpo_policy_loss,
    reduce_grpo_loss,
    sde_step_with_logprob,
)


def _latents(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)


def test_flow_sde_sample_mean_std_and_logprob():
    x, v = _latents()
    sigma, sigma_next = torch.tensor([0.5, 0.8]), torch.tensor([0.25, 0.6])
    prev, log_prob, mean, std = sde_step_with_logprob(
        x, v, sigma, sigma_next, noise_level=0.7, generator=torch.Generator().manual_seed(4)
    )
    # std = 0.7 sqrt(s / (1 - s)); mean = x (1 + std^2 ds / 2s) + v (1 + std^2 (1 - s) / 2s) ds.
    s, ds = sigma.view(-1, 1, 1, 1), (sigma_next - sigma).view(-1, 1, 1, 1)
    hand_std = 0.7 * torch.sqrt(s / (1 - s))
    hand_mean = (
        x * (1 + hand_std**2 * ds / (2 * s)) + v * (1 + hand_std**2 * (1 - s) / (2 * s)) * ds
    )
    torch.testing.assert_close(std, hand_std)
    torch.testing.assert_close(mean, hand_mean)
    std_t = hand_std * torch.sqrt(-ds)
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(prev, hand_mean + std_t * e)
    expected = Normal(hand_mean, std_t).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected)
    assert log_prob.shape == (2,)
    # A draw handed in is the one used: the sampler draws every step's noise up front.
    given = sde_step_with_logprob(x, v, sigma, sigma_next, noise_level=0.7, noise=2 * e)
    torch.testing.assert_close(given[0], hand_mean + 2 * std_t * e)


def test_given_prev_sample_is_scored_not_redrawn():
    x, v = _latents()
    target = torch.zeros_like(x)
    prev, log_prob, mean, std = sde_step_with_logprob(
        x, v, 0.5, 0.25, noise_level=0.7, prev_sample=target
    )
    assert torch.equal(prev, target)
    std_t = std * math.sqrt(0.25)
    torch.testing.assert_close(log_prob, Normal(mean, std_t).log_prob(target).mean(dim=(1, 2, 3)))


def test_flow_sde_at_sigma_one_uses_next_sigma_as_sigma_max():
    x, v = _latents()
    _, _, mean, std = sde_step_with_logprob(x, v, 1.0, 0.96, noise_level=0.5)
    # s_safe = 0.96: std = 0.5 * sqrt(1 / 0.04) = 2.5; mean = x (1 - 6.25 * 0.04 / 2) - 0.04 v.
    assert std.item() == pytest.approx(2.5)
    torch.testing.assert_close(mean, 0.875 * x - 0.04 * v)
    _, _, _, std_explicit = sde_step_with_logprob(x, v, 1.0, 0.96, noise_level=0.5, sigma_max=0.99)
    assert std_explicit.item() == pytest.approx(0.5 * math.sqrt(1 / 0.01))


def test_cps_step_by_formula():
    x, v = _latents()
    prev, log_prob, mean, std = sde_step_with_logprob(
        x, v, 0.5, 0.25, noise_level=0.5, sde_kind="cps", generator=torch.Generator().manual_seed(2)
    )
    hand_std = 0.25 * math.sin(0.5 * math.pi / 2)
    x0_hat, x1_hat = x - 0.5 * v, x + 0.5 * v
    hand_mean = x0_hat * 0.75 + x1_hat * math.sqrt(0.25**2 - hand_std**2)
    assert std.item() == pytest.approx(hand_std)
    torch.testing.assert_close(mean, hand_mean)
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(prev, hand_mean + hand_std * e)
    torch.testing.assert_close(log_prob, -((prev - hand_mean) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="SDE kind"):
        sde_step_with_logprob(x, v, 0.5, 0.25, noise_level=0.5, sde_kind="ode")


# Rewards of three prompts, two images each; prompt 2's images tie.
REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0])
PROMPTS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_advantages_global_std_by_hand():
    advantages, keep = group_advantages(REWARDS, PROMPTS)
    # Group means 1.5, 3.5, 5; global mean 10/3; squared deviations sum to 40/3; std = sqrt(20/9).
    a = 0.5 / (math.sqrt(20 / 9) + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([-a, a, -a, a, 0.0, 0.0]))
    assert keep.tolist() == [True, True, True, True, False, False]


def test_advantages_group_std_and_clipping_by_hand():
    advantages, keep = group_advantages(REWARDS, PROMPTS, global_std=False)
    a = 0.5 / (0.5 + 1e-4)  # each group's population std is 0.5
    torch.testing.assert_close(advantages, torch.tensor([-a, a, -a, a, 0.0, 0.0]))
    assert keep.tolist() == [True, True, True, True, False, False]
    clipped, _ = group_advantages(REWARDS, PROMPTS, adv_clip_max=0.3)
    torch.testing.assert_close(clipped, torch.tensor([-0.3, 0.3, -0.3, 0.3, 0.0, 0.0]))


def test_advantages_keep_groups_with_a_zero_member_and_reject_nan():
    # Group 0 = [1, 2, 3]: the middle image has A = 0 but its group is kept.
    advantages, keep = group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([7, 7, 7]))
    assert advantages[1] == 0 and keep.all()
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


def test_policy_loss_and_clip_fraction_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.0, 1.3])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    terms = grpo_policy_loss(ratio.log(), torch.zeros(4), advantages, clip_range=0.2)
    # max(-A r, -A clip(r, 0.8, 1.2)): max(-1.5, -1.2), max(-0.5, -0.8), max(1, 1), max(1.3, 1.2).
    torch.testing.assert_close(terms.policy_B, torch.tensor([-1.2, -0.5, 1.0, 1.3]))
    assert terms.clipped_B.tolist() == [1.0, 1.0, 0.0, 1.0]
    loss, metrics = reduce_grpo_loss(terms)
    assert loss.item() == pytest.approx(0.6 / 4)
    assert metrics["clip_fraction"].item() == 0.75
    hand_approx_kl = 0.5 * sum(math.log(r) ** 2 for r in ratio.tolist()) / 4
    assert metrics["approx_kl"].item() == pytest.approx(hand_approx_kl)


def test_kl_term_by_hand():
    mean_ref = torch.zeros(2, 1, 2, 2)
    mean_theta = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)])
    std = torch.full((2, 1, 1, 1), 0.5)
    zeros = torch.zeros(2)
    terms = grpo_policy_loss(
        zeros, zeros, torch.ones(2), clip_range=1e-4, mean_theta=mean_theta, mean_ref=mean_ref,
        std=std, beta=0.04,
    )  # fmt: skip
    # 1 / (2 * 0.25) = 2 and 4 / (2 * 0.25) = 8; ratio 1 so the policy term is -A = -1.
    torch.testing.assert_close(terms.kl_B, torch.tensor([2.0, 8.0]))
    loss, metrics = reduce_grpo_loss(terms)
    assert loss.item() == pytest.approx(-1.0 + 0.04 * 5.0)
    assert metrics["kl"].item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="beta"):
        grpo_policy_loss(zeros, zeros, zeros, clip_range=0.1, beta=0.04)
