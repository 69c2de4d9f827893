"""soar_ray.algo.flow against diffusers and hand computations (SPEC §0, §2)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from soar_ray.algo.flow import (
    Schedule,
    cat_cond,
    cfg_velocity,
    index_cond,
    loss_weight,
    make_inference_grid,
    make_schedule,
    repeat_cond,
    rollout_step,
    sample_t,
    sigma_to_t,
    t_to_sigma_timestep,
)

SCHEDULE = make_schedule(1000, shift=3.0)


def _diffusers_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def test_schedule_equals_diffusers_training_grid_plus_final_zero():
    reference = _diffusers_scheduler()
    assert SCHEDULE.sigmas.shape == (1001,) and SCHEDULE.timesteps.shape == (1000,)
    assert torch.equal(SCHEDULE.sigmas[:1000], reference.sigmas)
    assert SCHEDULE.sigmas[1000] == 0
    assert torch.equal(SCHEDULE.timesteps, reference.timesteps)
    assert SCHEDULE.sigma_max == reference.sigmas[1].item()


@pytest.mark.parametrize("num_steps", [1, 10, 40])
def test_inference_grid_equals_set_timesteps(num_steps):
    reference = _diffusers_scheduler()
    reference.set_timesteps(num_steps)
    for source in (SCHEDULE, 3.0):
        grid = make_inference_grid(source, num_steps)
        assert torch.equal(grid.sigmas, reference.sigmas)
        assert torch.equal(grid.timesteps, reference.timesteps)


def test_schedule_rejects_bad_arrays():
    with pytest.raises(ValueError, match="N\\+1"):
        Schedule(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="end with 0"):
        Schedule(torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match="shift"):
        make_inference_grid(Schedule(SCHEDULE.sigmas, SCHEDULE.timesteps), 10)


def test_t_to_sigma_timestep_hand_values():
    # i = (1 - t) * 1000; unshifted u = (1000 - i) / 1000; sigma = 3u / (1 + 2u).
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    sigma, timestep = t_to_sigma_timestep(t, SCHEDULE)
    # u = 1, 0.75, 0.5, 0.25, and t = 0 clamps to i = 999 (u = 0.001).
    expected = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.003 / 1.002])
    torch.testing.assert_close(sigma, expected)
    torch.testing.assert_close(timestep, expected * 1000)


def test_sigma_to_t_hand_values():
    # First grid index with sigma <= s; u = s / (3 - 2s) inverts the shift.
    # s = 0.76: u = 0.76 / 1.48 = 0.51351 -> first i with (1000 - i) / 1000 <= u is 487.
    s = torch.tensor([1.0, 0.76, 0.75, 0.0])
    expected = torch.tensor([1.0, 0.513, 0.5, 0.001])
    torch.testing.assert_close(sigma_to_t(s, SCHEDULE), expected)


def test_logit_normal_density_matches_diffusers_and_hand_replay():
    t = sample_t(5, scheme="logit_normal", generator=torch.Generator().manual_seed(3))
    replay = torch.sigmoid(torch.randn(5, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(t, replay)
    reference = compute_density_for_timestep_sampling(
        "logit_normal", 5, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(t, reference)


def test_mode_and_uniform_density_by_hand():
    t = sample_t(4, scheme="mode", mode_scale=1.29, generator=torch.Generator().manual_seed(1))
    u = torch.rand(4, generator=torch.Generator().manual_seed(1)).tolist()
    expected = [1 - x - 1.29 * (math.cos(math.pi * x / 2) ** 2 - 1 + x) for x in u]
    torch.testing.assert_close(t, torch.tensor(expected))
    uniform = sample_t(4, scheme="uniform", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(uniform, torch.tensor(u))
    with pytest.raises(ValueError, match="density"):
        sample_t(2, scheme="cosmap")


def test_loss_weights_by_hand():
    sigma = torch.tensor([0.5, 0.25, 0.0])
    torch.testing.assert_close(loss_weight(sigma[:2], "sigma_sqrt"), torch.tensor([4.0, 16.0]))
    # cosmap 2 / (pi (1 - 2s + 2s^2)): s = 0.5 -> 4 / pi, 0.25 -> 2 / (0.625 pi), 0 -> 2 / pi
    cosmap = torch.tensor([4 / math.pi, 2 / (0.625 * math.pi), 2 / math.pi])
    torch.testing.assert_close(loss_weight(sigma, "cosmap"), cosmap)
    torch.testing.assert_close(loss_weight(sigma, "none"), torch.ones(3))
    with pytest.raises(ValueError, match="weighting"):
        loss_weight(sigma, "logit_normal")


def test_cfg_velocity_by_hand():
    v = cfg_velocity(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 1.0]), 4.5)
    torch.testing.assert_close(v, torch.tensor([1.0 + 4.5, -1.0 + 4.5 * 2]))


def _step(kind, x=1.0, v=2.0, sigma=0.5, sigma_next=0.25, eta=0.5, e=2.0, sigma_max=0.96):
    """One 1x1x1x1 step with explicit noise e."""
    as_latent = lambda value: torch.full((1, 1, 1, 1), value)  # noqa: E731
    out = rollout_step(
        as_latent(x), as_latent(v), torch.tensor([sigma]), torch.tensor([sigma_next]),
        kind=kind, noise_scale=eta, sigma_max=sigma_max, noise=as_latent(e),
    )  # fmt: skip
    return out.item()


def test_rollout_step_kinds_by_hand():
    # x = 1, v = 2, s = 0.5, s' = 0.25, ds = -0.25, eta = 0.5, e = 2.
    assert _step("ode") == pytest.approx(1 - 0.5)
    assert _step("simple") == pytest.approx(0.5 + 0.5 * 0.5 * 2)
    # x0h = 1 - 0.5 * 2 = 0, x' = 0.75 * 0 + 0.25 * 2.
    assert _step("sde") == pytest.approx(0.5)
    # std = 0.5 sqrt(0.5 / 0.5) = 0.5; mean = 1 (1 - 0.25/1 * 0.25) + 2 (1 + 0.25*0.5/1)(-0.25)
    #     = 0.9375 - 0.5625 = 0.375; x' = 0.375 + 0.5 * sqrt(0.25) * 2 = 0.875.
    assert _step("flow_sde") == pytest.approx(0.875)
    # cps: std = 0.25 sin(pi/4); x0h = 0, x1h = 1 + 0.5 * 2 = 2;
    #      mean = 0 + 2 sqrt(0.0625 - 0.03125); x' = mean + std * 2.
    std = 0.25 * math.sin(math.pi / 4)
    assert _step("cps") == pytest.approx(2 * math.sqrt(0.03125) + 2 * std)
    with pytest.raises(ValueError, match="rollout kind"):
        _step("euler")


def test_flow_sde_at_sigma_one_uses_sigma_max():
    # s = 1 -> s_safe = 0.96: std = 0.5 sqrt(1 / 0.04) = 2.5; s' = 0.96, ds = -0.04;
    # mean = x (1 + 6.25 / 2 * -0.04) + v (1 + 0) (-0.04) = 0.875 - 0.08 = 0.795;
    # x' = 0.795 + 2.5 * sqrt(0.04) * 2 = 1.795.
    assert _step("flow_sde", sigma=1.0, sigma_next=0.96) == pytest.approx(1.795)


def test_rollout_step_per_sample_sigmas_dtype_and_generator():
    x = torch.ones(2, 1, 2, 2, dtype=torch.bfloat16)
    v = torch.full_like(x, 2.0)
    sigmas, sigmas_next = torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.5])
    out = rollout_step(x, v, sigmas, sigmas_next, kind="ode", noise_scale=0.0, sigma_max=0.9)
    assert out.dtype == torch.bfloat16
    assert out[0].unique().item() == 0.5 and out[1].unique().item() == 0.0
    kwargs = {"kind": "simple", "noise_scale": 0.5, "sigma_max": 0.9}
    drawn = rollout_step(
        x.float(), v.float(), sigmas, sigmas_next, generator=torch.Generator().manual_seed(7),
        **kwargs,
    )  # fmt: skip
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    given = rollout_step(x.float(), v.float(), sigmas, sigmas_next, noise=noise, **kwargs)
    assert torch.equal(drawn, given)


def test_cond_helpers():
    cond = {"prompt_embeds": torch.arange(6.0).view(3, 2, 1), "pooled_embeds": torch.arange(3.0)}
    picked = index_cond(cond, torch.tensor([2, 0]))
    assert picked["pooled_embeds"].tolist() == [2.0, 0.0]
    assert picked["prompt_embeds"][0].flatten().tolist() == [4.0, 5.0]
    joined = cat_cond([cond, picked])
    assert joined["pooled_embeds"].tolist() == [0.0, 1.0, 2.0, 2.0, 0.0]
    repeated = repeat_cond(cond, 2)
    assert repeated["pooled_embeds"].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="keys"):
        cat_cond([cond, {"prompt_embeds": cond["prompt_embeds"]}])
