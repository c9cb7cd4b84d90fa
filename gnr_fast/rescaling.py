"""Noise rescaling (DESIGN.md §5): the factor γ applied to the guider gradient."""

from __future__ import annotations

import torch

from .config import RescaleConfig


def rescale_gamma(config: RescaleConfig, delta_cfg: torch.Tensor, guider_grad: torch.Tensor | None) -> torch.Tensor:
    """γ as a 0-dim float32 tensor on the inputs' device (no host sync), such that
    ‖γ · grad‖₂ / ‖Δcfg‖₂ lies in [lo, hi] (``range_other_on_cfg_norm``), else 1.

    Plain (unsquared) L2 norms over the whole tensor, computed in float32, as the reference
    implementation computes them; ratio = 1 when ‖Δcfg‖ = 0 and γ = 1 when ‖grad‖ = 0 or there is
    no gradient.
    """
    one = torch.ones((), dtype=torch.float32, device=delta_cfg.device)
    if config.kind == "identity_rescaler" or guider_grad is None:
        return one
    cfg_norm = torch.linalg.vector_norm(delta_cfg.float())
    other_norm = torch.linalg.vector_norm(guider_grad.float())
    return _range_gamma(cfg_norm, other_norm, config.lo, config.hi)


def _range_gamma(cfg_norm: torch.Tensor, other_norm: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """γ = clip(ratio, lo, hi) / ratio with ratio = other_norm / cfg_norm (1 when cfg_norm = 0), γ = 1
    when other_norm = 0; tensors in, a tensor out."""
    ratio = torch.where(cfg_norm != 0, other_norm / torch.where(cfg_norm != 0, cfg_norm, 1.0), 1.0)
    gamma = torch.clamp(ratio, lo, hi) / torch.where(ratio != 0, ratio, 1.0)
    return torch.where(other_norm == 0, torch.ones_like(gamma), gamma)


def rescale_factor(config: RescaleConfig, delta_cfg: torch.Tensor, guider_grad: torch.Tensor | None) -> float:
    """:func:`rescale_gamma` as a Python float (one host sync)."""
    return float(rescale_gamma(config, delta_cfg, guider_grad))


def range_rescale_from_norms(cfg_norm: float, other_norm: float, lo: float, hi: float) -> float:
    """γ from two norms given as floats (see :func:`rescale_gamma`)."""
    return float(_range_gamma(torch.tensor(float(cfg_norm), dtype=torch.float64),
                              torch.tensor(float(other_norm), dtype=torch.float64), lo, hi))
