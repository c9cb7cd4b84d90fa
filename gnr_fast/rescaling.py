"""Noise rescaling (DESIGN.md §5): the factor γ applied to the guider gradient."""

from __future__ import annotations

import numpy as np
import torch

from .config import RescaleConfig


def rescale_factor(config: RescaleConfig, delta_cfg: torch.Tensor, guider_grad: torch.Tensor | None) -> float:
    """γ such that ‖γ · grad‖₂ / ‖Δcfg‖₂ lies in [lo, hi] (``range_other_on_cfg_norm``), else 1.

    Plain (unsquared) L2 norms over the whole tensor, as the reference implementation computes
    them; ratio = 1 when ‖Δcfg‖ = 0 and γ = 1 when ‖grad‖ = 0 or there is no gradient.
    """
    if config.kind == "identity_rescaler" or guider_grad is None:
        return 1.0
    cfg_norm = torch.linalg.vector_norm(delta_cfg).item()
    other_norm = torch.linalg.vector_norm(guider_grad).item()
    return range_rescale_from_norms(cfg_norm, other_norm, config.lo, config.hi)


def range_rescale_from_norms(cfg_norm: float, other_norm: float, lo: float, hi: float) -> float:
    """γ = clip(ratio, lo, hi) / ratio with ratio = other_norm / cfg_norm (see :func:`rescale_factor`)."""
    ratio = other_norm / cfg_norm if cfg_norm != 0 else 1.0
    if other_norm == 0.0:
        return 1.0
    return float(np.clip(ratio, lo, hi) / ratio)
