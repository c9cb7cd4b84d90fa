"""Noise rescaling edge cases (DESIGN.md §5)."""

import pytest
import torch

from gnr_fast.config import RescaleConfig
from gnr_fast.rescaling import range_rescale_from_norms, rescale_factor

RANGE = RescaleConfig("range_other_on_cfg_norm", 0.33, 3.0)


def test_ratio_inside_range_keeps_gradient():
    assert range_rescale_from_norms(2.0, 3.0, 0.33, 3.0) == 1.0


def test_clips_down_when_gradient_too_large():
    gamma = range_rescale_from_norms(1.0, 10.0, 0.33, 3.0)
    assert gamma == pytest.approx(0.3) and gamma * 10.0 == pytest.approx(3.0)


def test_clips_up_when_gradient_too_small():
    gamma = range_rescale_from_norms(1.0, 0.1, 0.33, 3.0)
    assert gamma * 0.1 == pytest.approx(0.33)


def test_zero_cfg_norm_uses_ratio_one():
    # ratio = 1 when ‖Δcfg‖ = 0, so γ = clip(1, lo, hi) / 1
    assert range_rescale_from_norms(0.0, 5.0, 1.5, 1.5) == pytest.approx(1.5)
    assert range_rescale_from_norms(0.0, 5.0, 0.33, 3.0) == 1.0


def test_zero_gradient_norm_gives_one():
    assert range_rescale_from_norms(2.0, 0.0, 0.33, 3.0) == 1.0


def test_tensor_norms_are_plain_l2():
    delta = torch.full((1, 4, 2, 2), 0.5)  # ‖·‖ = 2
    grad = torch.full((1, 4, 2, 2), 5.0)  # ‖·‖ = 20 → ratio 10 → γ = 0.3
    assert rescale_factor(RANGE, delta, grad) == pytest.approx(0.3)
    assert rescale_factor(RescaleConfig("identity_rescaler"), delta, grad) == 1.0
    assert rescale_factor(RANGE, delta, None) == 1.0
