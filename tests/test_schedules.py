"""DDIM schedule and steps against closed forms (DESIGN.md §1–3)."""

import math

import pytest
import torch

from gnr_fast.errors import InputError
from gnr_fast.schedules import NoiseSchedule, ddim_move, ddim_step_down, ddim_step_up, ddim_timesteps


@pytest.fixture
def schedule():
    return NoiseSchedule.from_betas()


def test_timesteps_leading_no_offset():
    ts = ddim_timesteps(50)
    assert ts[:3] == [980, 960, 940] and ts[-1] == 0 and len(ts) == 50
    assert ddim_timesteps(10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True, "50"])
def test_timesteps_reject_bad_counts(bad):
    with pytest.raises(InputError):
        ddim_timesteps(bad)


def test_alphas_cumprod_scaled_linear(schedule):
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    expected = 1.0
    for i in (0, 1, 500, 999):
        expected = math.prod(1 - b for b in betas[: i + 1])
        assert schedule.alphas_cumprod[i].item() == pytest.approx(expected, rel=1e-4)


def test_step_down_closed_form(schedule):
    torch.manual_seed(0)
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    a_t, a_prev = schedule.alphas_cumprod[500], schedule.alphas_cumprod[480]
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(ddim_step_down(schedule, eps, 500, z, 50), expected)


def test_last_step_lands_on_alpha_bar_zero(schedule):
    z, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    out = ddim_step_down(schedule, eps, 0, z, 50)
    expected = ddim_move(eps, z, schedule.alphas_cumprod[0], schedule.alphas_cumprod[0])
    torch.testing.assert_close(out, expected)
    # set_alpha_to_one=False: stepping from t=0 with ᾱ_prev = ᾱ_0 returns z itself.
    torch.testing.assert_close(out, z)


def test_inversion_top_step_clamps_to_last_alpha(schedule):
    z, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    out = ddim_step_up(schedule, eps, 980, z, 50)
    expected = ddim_move(eps, z, schedule.alphas_cumprod[980], schedule.alphas_cumprod[999])
    torch.testing.assert_close(out, expected)


def test_up_then_down_is_identity_for_same_eps(schedule):
    torch.manual_seed(1)
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    up = ddim_step_up(schedule, eps, 400, z, 50)
    back = ddim_step_down(schedule, eps, 420, up, 50)
    torch.testing.assert_close(back, z, rtol=0, atol=5e-6)  # measured max |back − z| 4.8e-7 (float32)


def test_v_prediction_matches_eps_form():
    s_eps = NoiseSchedule.from_betas(prediction_type="epsilon")
    s_v = NoiseSchedule.from_betas(prediction_type="v_prediction")
    torch.manual_seed(2)
    x0, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    a = s_eps.alphas_cumprod[600]
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    # measured max difference 1.2e-7 (float32 rounding of the two forms)
    torch.testing.assert_close(ddim_step_down(s_v, v, 600, z, 50), ddim_step_down(s_eps, eps, 600, z, 50), rtol=0, atol=1e-6)
