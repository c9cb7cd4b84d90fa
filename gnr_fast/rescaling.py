"""Noise rescaling (DESIGN.md §5): the factor γ applied to the guider gradient.

Norms and γ are computed in float32 whatever the dtype of Δcfg and the gradient (docs/precision.md):
a float16 norm overflows past 65504. :func:`rescale_gamma` keeps γ on the tensors' device (no host
sync) — on CUDA with Triton both norms and γ come from one kernel launch
(:func:`gnr_fast.ops.rescale_norms.rescale_gammas`), elsewhere from the torch expressions below;
:func:`rescale_factor` is the same value as a Python float.
"""

from __future__ import annotations

import torch

from .config import RescaleConfig
from .ops.rescale_norms import rescale_gammas, rescale_path
from .precision import compute_dtype_for


def tensor_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Plain L2 norm over the whole tensor, accumulated in float32 (float64 stays): a 0-dim tensor."""
    return torch.linalg.vector_norm(tensor, dtype=compute_dtype_for(tensor.dtype))


def rescale_gamma(config: RescaleConfig, delta_cfg: torch.Tensor, guider_grad: torch.Tensor | None) -> torch.Tensor:
    """γ as a 0-dim float32 tensor on ``delta_cfg``'s device, computed without a host sync.

    γ is such that ‖γ · grad‖₂ / ‖Δcfg‖₂ lies in [lo, hi] (``range_other_on_cfg_norm``), else 1.
    Plain (unsquared) L2 norms over the whole tensor, as the reference implementation computes
    them; ratio = 1 when ‖Δcfg‖ = 0 and γ = 1 when ‖grad‖ = 0 or there is no gradient.
    """
    dtype = compute_dtype_for(delta_cfg.dtype)
    if config.kind == "identity_rescaler" or guider_grad is None:
        return torch.ones((), dtype=dtype, device=delta_cfg.device)
    if rescale_path(delta_cfg, guider_grad) == "triton":
        # One launch for both norms and γ; the whole tensor is one "image" (as the norms below).
        gamma, _ = rescale_gammas(delta_cfg.reshape(1, -1), guider_grad.reshape(1, -1), config.lo, config.hi)
        return gamma.reshape(())
    return range_gamma(tensor_norm(delta_cfg), tensor_norm(guider_grad).to(delta_cfg.device), config.lo, config.hi)


def rescale_factor(config: RescaleConfig, delta_cfg: torch.Tensor, guider_grad: torch.Tensor | None) -> float:
    """:func:`rescale_gamma` as a Python float (one host sync)."""
    return float(rescale_gamma(config, delta_cfg, guider_grad))


def range_gamma(cfg_norm: torch.Tensor, other_norm: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """γ = clip(ratio, lo, hi) / ratio with ratio = other_norm / cfg_norm, on 0-dim norm tensors.

    ratio = 1 when ``cfg_norm`` is 0; γ = 1 when ``other_norm`` is 0 (see :func:`rescale_gamma`).
    """
    one = torch.ones_like(cfg_norm)
    ratio = torch.where(cfg_norm != 0, other_norm / torch.where(cfg_norm != 0, cfg_norm, one), one)
    safe_ratio = torch.where(other_norm != 0, ratio, one)
    return torch.where(other_norm != 0, torch.clamp(safe_ratio, lo, hi) / safe_ratio, one)


def range_rescale_from_norms(cfg_norm: float, other_norm: float, lo: float, hi: float) -> float:
    """:func:`range_gamma` on Python floats (float32 arithmetic, as on tensors)."""
    gamma = range_gamma(torch.tensor(cfg_norm, dtype=torch.float32), torch.tensor(other_norm, dtype=torch.float32), lo, hi)
    return float(gamma)
