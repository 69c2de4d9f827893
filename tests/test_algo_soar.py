"""SOAR auxiliary points and loss (SPEC §1) against hand computations."""

import dataclasses

import pytest
import torch
from torch import nn

from soar_ray.algo.flow import (
    index_cond,
    make_schedule,
    rollout_step,
    t_to_sigma_timestep,
    weighted_mse,
)
from soar_ray.algo.soar import (
    SoarHyperParams,
    build_aux_points,
    correction_target,
    normalize_soar_loss,
    soar_losses,
)

SCHEDULE = make_schedule(1000, shift=3.0)
GRID = {"schedule": SCHEDULE}
SHAPE = (4, 2, 3, 3)


class TinyDenoiser(nn.Module):
    """A conv net that reads the timestep and both conditioning tensors."""

    def __init__(self, channels: int = 2, embed_dim: int = 3, pooled_dim: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(embed_dim + pooled_dim + 1, channels)
        self.batch_sizes: list[int] = []

    def forward(self, x, timestep, cond):
        self.batch_sizes.append(x.shape[0])
        features = [cond["prompt_embeds"].mean(1), cond["pooled_embeds"], timestep[:, None] / 1000]
        return self.conv(x) + self.film(torch.cat(features, 1))[:, :, None, None]


def _batch(seed: int = 0, num: int = 4):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(num, *SHAPE[1:], generator=g)
    cond = {
        "prompt_embeds": torch.randn(num, 5, 3, generator=g),
        "pooled_embeds": torch.randn(num, 2, generator=g),
    }
    uncond = {"prompt_embeds": torch.zeros(1, 5, 3), "pooled_embeds": torch.zeros(1, 2)}
    return z0, cond, uncond


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z_t0, v, z1 = (torch.randn(SHAPE, generator=g) for _ in range(3))
    # The last sample has t0 < 1/K, so t1 = 0 and it gets no stochastic path.
    t0 = torch.tensor([0.9, 0.5, 0.3, 0.01])
    return z_t0, t0, v, z1


def _points(num_paths: int, num_points: int = 3, seed: int = 0, **kwargs):
    z_t0, t0, v, z1 = _inputs()
    return build_aux_points(
        z_t0, t0, v, z1, num_paths=num_paths, points_per_path=num_points,
        num_sampling_steps=40, generator=torch.Generator().manual_seed(seed), **GRID, **kwargs,
    )  # fmt: skip


def test_ode_points_lie_on_segment_from_euler_step_to_noise():
    z_t0, t0, v, z1 = _inputs()
    s0, _ = t_to_sigma_timestep(t0, SCHEDULE)
    s1, _ = t_to_sigma_timestep((t0 - 1 / 40).clamp_min(0), SCHEDULE)
    z1p = z_t0 + v * (s1 - s0).view(-1, 1, 1, 1)
    for point in _points(num_paths=1):
        assert ((point.sigmas >= s1) & (point.sigmas <= 1)).all()
        alpha = ((point.sigmas - s1) / (1 - s1)).view(-1, 1, 1, 1)
        torch.testing.assert_close(point.latents, (1 - alpha) * z1p + alpha * z1)
        _, grid_timesteps = t_to_sigma_timestep(1 - _grid_index(point.sigmas) / 1000, SCHEDULE)
        assert torch.equal(point.timesteps, grid_timesteps)


def _grid_index(sigmas: torch.Tensor) -> torch.Tensor:
    """First grid index whose sigma is <= s, by a plain scan."""
    return torch.tensor([int((SCHEDULE.sigmas[:1000] > s).sum()) for s in sigmas.tolist()])


def test_correction_target_recovers_clean_latent():
    z0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for point in _points(num_paths=2):
        v_corr = correction_target(point, z0)
        rebuilt = point.latents - point.sigmas.view(-1, 1, 1, 1) * v_corr
        torch.testing.assert_close(rebuilt, z0[point.indices])


def test_point_count_and_indices():
    single = _points(num_paths=1, num_points=3)
    assert len(single) == 3
    assert all(p.indices.tolist() == [0, 1, 2, 3] for p in single)
    multi = _points(num_paths=3, num_points=2)
    # ODE path: 2 points of all 4 samples; 2 stochastic paths: 2 points each of samples with t1 > 0.
    assert [p.indices.tolist() for p in multi] == [[0, 1, 2, 3]] * 2 + [[0, 1, 2]] * 4
    assert _points(num_paths=3, num_points=0) == []


def test_random_draw_order_replays_by_hand():
    z_t0, t0, v, z1 = _inputs()
    torch.manual_seed(11)
    points = build_aux_points(
        z_t0, t0, v, z1, num_paths=2, points_per_path=2, num_sampling_steps=40, **GRID
    )
    torch.manual_seed(11)
    r_ode = torch.rand(2, 4)
    noise = torch.randn(3, *SHAPE[1:])
    r_sde = torch.rand(2, 3)
    s0, _ = t_to_sigma_timestep(t0, SCHEDULE)
    s1, _ = t_to_sigma_timestep((t0 - 1 / 40).clamp_min(0), SCHEDULE)
    expected_sigmas = [s1 + r * (1 - s1) for r in r_ode] + [
        s1[:3] + r * (1 - s1[:3]) for r in r_sde
    ]
    for point, expected in zip(points, expected_sigmas):
        assert torch.equal(point.sigmas, expected)
    z1p = rollout_step(
        z_t0[:3], v[:3], s0[:3], s1[:3], kind="flow_sde", noise_scale=0.5,
        sigma_max=SCHEDULE.sigma_max, noise=noise,
    )  # fmt: skip
    alpha = ((points[2].sigmas - s1[:3]) / (1 - s1[:3])).view(-1, 1, 1, 1)
    torch.testing.assert_close(points[2].latents, (1 - alpha) * z1p + alpha * z1[:3])


def test_sigma_upper_ratio_bounds_points():
    z_t0, t0, v, z1 = _inputs()
    s0, _ = t_to_sigma_timestep(t0, SCHEDULE)
    for point in _points(num_paths=1, sigma_upper_ratio=1.2):
        assert (point.sigmas <= (1.2 * s0).clamp_max(1)).all()


def _sft_loss(model, z0, cond, z1, t0):
    s0, ts0 = t_to_sigma_timestep(t0, SCHEDULE)
    s = s0.view(-1, 1, 1, 1)
    v = model((1 - s) * z0 + s * z1, ts0, cond)
    return ((v - (z1 - z0)) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("change", [{"lambda_aux": 0.0}, {"trajectory_length": 0}])
def test_no_aux_is_exactly_sft(change):
    torch.manual_seed(0)
    model = TinyDenoiser()
    z0, cond, uncond = _batch()
    z1, t0 = torch.randn(SHAPE), torch.tensor([0.9, 0.5, 0.3, 0.01])
    hp = SoarHyperParams(**change)
    losses = soar_losses(model, z0, cond, uncond, SCHEDULE, hp, z1=z1, t0=t0)
    assert losses.num_aux == 0 and losses.aux == [] and model.batch_sizes == [4]
    assert torch.equal(losses.main_B, _sft_loss(model, z0, cond, z1, t0))
    total = normalize_soar_loss(losses.sum_main(), losses.sum_aux(), 4, 0, hp.lambda_aux, 1)
    torch.testing.assert_close(total, losses.main_B.mean())


def test_fused_equals_sequential_losses_and_grads():
    torch.manual_seed(0)
    model = TinyDenoiser()
    z0, cond, uncond = _batch()
    results = []
    for aux_eval in ("fused", "sequential"):
        hp = SoarHyperParams(num_rollout_paths=2, trajectory_length=3, aux_eval=aux_eval)
        model.batch_sizes.clear()
        model.zero_grad()
        losses = soar_losses(
            model, z0, cond, uncond, SCHEDULE, hp, generator=torch.Generator().manual_seed(3)
        )
        loss = normalize_soar_loss(
            losses.sum_main(), losses.sum_aux(), losses.num_main, losses.num_aux, 1.0, 1
        )
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((losses, loss, grads, list(model.batch_sizes)))
    (fused, fused_loss, fused_grads, fused_calls), (seq, seq_loss, seq_grads, seq_calls) = results
    num_points = len(seq.aux)
    assert fused_calls == [8, 4 + fused.num_aux]  # rollout on [z; z], then ONE forward.
    assert len(seq_calls) == 2 + num_points and seq_calls[:2] == [8, 4]
    assert fused.num_aux == seq.num_aux > 0
    torch.testing.assert_close(fused.main_B, seq.main_B)
    for a, b in zip(fused.aux, seq.aux):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fused_loss, seq_loss)
    for a, b in zip(fused_grads, seq_grads):
        torch.testing.assert_close(a, b)


def test_cond_dropout_trains_on_uncond():
    torch.manual_seed(0)
    model = TinyDenoiser()
    z0, cond, uncond = _batch()
    z1, t0 = torch.randn(SHAPE), torch.tensor([0.9, 0.5, 0.3, 0.01])
    hp = SoarHyperParams(lambda_aux=0.0, cond_dropout_rate=1.0)
    losses = soar_losses(model, z0, cond, uncond, SCHEDULE, hp, z1=z1, t0=t0)
    uncond_B = {k: v.expand(4, *v.shape[1:]) for k, v in uncond.items()}
    torch.testing.assert_close(losses.main_B, _sft_loss(model, z0, uncond_B, z1, t0))
    assert losses.diagnostics["cond_dropped"].item() == 1.0


def test_normalize_soar_loss_by_hand():
    # (3 + 0.5 * 6) / (4 + 0.5 * 12) * 2 = 1.2
    loss = normalize_soar_loss(torch.tensor(3.0), torch.tensor(6.0), 4, 12, 0.5, 2)
    assert loss.item() == pytest.approx(1.2)
    counts = (torch.tensor(4.0), torch.tensor(12.0))
    assert normalize_soar_loss(torch.tensor(3.0), torch.tensor(6.0), *counts, 0.0, 2) == 1.5
    assert normalize_soar_loss(torch.tensor(0.0), torch.tensor(0.0), 0, 0, 1.0, 1) == 0.0


def test_two_ranks_match_one_rank_including_gradient():
    """Uneven aux counts per rank (t1 = 0 samples) still give the global per-point mean."""
    torch.manual_seed(0)
    model = TinyDenoiser()
    z0, cond, _ = _batch(num=4)
    z_t0, t0, v, z1 = _inputs()
    points = build_aux_points(
        z_t0, t0, v, z1, num_paths=3, points_per_path=2, num_sampling_steps=40, **GRID
    )
    lambda_aux = 0.7
    ts0 = t_to_sigma_timestep(t0, SCHEDULE)[1]

    def rank_sums(samples: torch.Tensor):
        """This rank's (sum_main, sum_aux, num_main, num_aux) over its samples' points."""
        pred = model(z_t0[samples], ts0[samples], index_cond(cond, samples))
        main = weighted_mse(pred, (z1 - z0)[samples], torch.ones(samples.numel()))
        aux, num_aux = torch.zeros(()), 0
        for p in points:
            keep = torch.isin(p.indices, samples)
            pred = model(p.latents[keep], p.timesteps[keep], index_cond(cond, p.indices[keep]))
            target = correction_target(p, z0)[keep]
            aux = aux + weighted_mse(pred, target, torch.ones(pred.shape[0])).sum()
            num_aux += pred.shape[0]
        return main.sum(), aux, samples.numel(), num_aux

    def grads_of(loss):
        return torch.autograd.grad(loss, list(model.parameters()))

    single = rank_sums(torch.arange(4))
    single_grads = grads_of(normalize_soar_loss(*single, lambda_aux, 1))
    ranks = [rank_sums(torch.tensor([0, 1])), rank_sums(torch.tensor([2, 3]))]
    num_main = sum(r[2] for r in ranks)
    num_aux = sum(r[3] for r in ranks)
    assert (ranks[0][3], ranks[1][3]) == (12, 8)  # sample 3 has t1 = 0: ODE points only.
    rank_losses = [normalize_soar_loss(r[0], r[1], num_main, num_aux, lambda_aux, 2) for r in ranks]
    torch.testing.assert_close(sum(rank_losses) / 2, normalize_soar_loss(*single, lambda_aux, 1))
    averaged = [sum(g) / 2 for g in zip(*(grads_of(loss) for loss in rank_losses))]
    for a, b in zip(averaged, single_grads):
        torch.testing.assert_close(a, b)


def test_hyper_params_validation_names_field():
    with pytest.raises(ValueError, match="SoarHyperParams.rollout_kind"):
        SoarHyperParams(rollout_kind="euler")
    with pytest.raises(ValueError, match="SoarHyperParams.num_rollout_paths"):
        dataclasses.replace(SoarHyperParams(), num_rollout_paths=0)
