import torch

from soar_ray.algo.flow import make_inference_grid
from soar_ray.algo.sampling import sample_ode


def _denoiser(v_uncond: float, v_cond: float):
    """Constant velocity per sample: v_cond where cond['flag'] is 1, v_uncond where it is 0."""

    def denoiser(x, timestep, cond):
        flag = cond["flag"].view(-1, 1, 1, 1)
        return torch.ones_like(x) * (flag * v_cond + (1 - flag) * v_uncond)

    return denoiser


def test_constant_velocity_integrates_exactly_from_noise_to_zero_sigma():
    # sigma goes 1 -> 0, so the ODE moves x by -v in total, whatever the grid.
    noise = torch.randn(2, 4, 3, 3)
    cond, uncond = {"flag": torch.ones(2)}, {"flag": torch.zeros(2)}
    grid = make_inference_grid(3.0, 7)
    out = sample_ode(_denoiser(0.5, 2.0), noise, grid, cond, uncond, guidance=3.0)
    v_cfg = 0.5 + 3.0 * (2.0 - 0.5)
    torch.testing.assert_close(out, noise - v_cfg)


def test_clean_sample_is_a_fixed_point_of_the_true_velocity():
    # x_s = (1 - s) z0 + s z1 with v = z1 - z0: Euler is exact on straight lines.
    z0, z1 = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)

    def denoiser(x, timestep, cond):
        return (z1 - z0).expand_as(x)

    cond = {"flag": torch.ones(1)}
    out = sample_ode(denoiser, z1, make_inference_grid(3.0, 5), cond, cond, guidance=4.5)
    torch.testing.assert_close(out, z0, atol=1e-5, rtol=1e-5)
