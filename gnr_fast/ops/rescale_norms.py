"""Noise-rescale norms and the clipped γ in one launch, per image, on the device (DESIGN.md §5).

For image b of a batch (one image per row of [B, ...] tensors)::

    c_b = ‖Δcfg_b‖₂,  o_b = ‖grad_b‖₂                 (plain, unsquared norms, float32)
    ratio_b = o_b / c_b   (1 when c_b = 0)
    γ_b = clip(ratio_b, lo, hi) / ratio_b   (1 when o_b = 0)

Layers, as in STYLE.md rule 3:

- :func:`rescale_gammas_ref` — the pure-torch formula (``torch.linalg.vector_norm`` per image).
- :func:`rescale_gammas` — the public op: ``(γ [B], norms [B, 2])`` float32, on the inputs'
  device, without a host sync. On CUDA with Triton (:func:`rescale_triton_supported`) one
  program per image of ``kernels/rescale_norms.py`` (the ``torch.library.triton_op``
  ``gnr_fast::rescale_gamma``) computes both norms and γ in one launch; elsewhere the reference.

:func:`gnr_fast.rescaling.rescale_gamma` uses it on CUDA; on CPU it keeps its own torch
expression, so CPU results (and golden parity) are unchanged. γ has no gradient (Δcfg and the
guider gradient are results of no-grad passes and of ``autograd.grad``).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor

from gnr_fast.devices import on_device
from gnr_fast.errors import InputError
from gnr_fast.ops.path_choice import choose_path
from gnr_fast.ops.triton_kernels import (
    kernel_module,
    launch_unsupported_reason,
)

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "triton"]
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024  # values per step of one image's sweep (a 512² latent is 16384 values per image)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def rescale_gammas_ref(delta_cfg: Tensor, grad: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """``(γ [B], norms [B, 2])`` in float32 by torch: norms are (‖Δcfg_b‖, ‖grad_b‖) per image."""
    cfg_norm = torch.linalg.vector_norm(delta_cfg.flatten(1), dim=1, dtype=torch.float32)  # [B]
    other_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=torch.float32)  # [B]
    one = torch.ones_like(cfg_norm)
    ratio = torch.where(cfg_norm != 0, other_norm / torch.where(cfg_norm != 0, cfg_norm, one), one)
    safe_ratio = torch.where(other_norm != 0, ratio, one)
    gamma = torch.where(other_norm != 0, torch.clamp(safe_ratio, lo, hi) / safe_ratio, one)
    return gamma, torch.stack([cfg_norm, other_norm], dim=1)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def rescale_gammas(
    delta_cfg: Tensor, grad: Tensor, lo: float, hi: float, backend: Backend = "auto"
) -> tuple[Tensor, Tensor]:
    """γ of ``range_other_on_cfg_norm`` for each image, computed on the device.

    Args:
        delta_cfg: Δcfg, [B, ...] (one image per row), float32/float16/bfloat16.
        grad: the guider gradient ∂E/∂z, same shape and device (any of those dtypes).
        lo, hi: bounds of the norm ratio, 0 < lo ≤ hi (``RescaleConfig.lo``/``hi``).
        backend: ``"auto"`` takes the Triton kernel when :func:`rescale_triton_supported` holds,
            else torch; ``"torch"``/``"triton"`` force one (``"triton"`` raises
            :class:`BackendUnavailableError` with the reason; on CPU only under
            ``TRITON_INTERPRET=1``).

    Returns:
        ``(gamma, norms)``: gamma [B] float32, norms [B, 2] float32 = (‖Δcfg_b‖, ‖grad_b‖), both
        on ``delta_cfg``'s device; no host sync. Equal to :func:`rescale_gammas_ref` up to the
        summation order of the norms.

    Raises:
        InputError: shapes, dtypes, devices, bounds or ``backend`` are invalid.
    """
    _check_inputs(delta_cfg, grad, lo, hi, backend)
    if rescale_path(delta_cfg, grad, backend) == "triton":
        return torch.ops.gnr_fast.rescale_gamma(delta_cfg.detach(), grad.detach(), float(lo), float(hi))
    return rescale_gammas_ref(delta_cfg.detach(), grad.detach(), lo, hi)


def rescale_triton_supported(delta_cfg: Tensor, grad: Tensor, allow_interpreter: bool = False) -> bool:
    """True when the Triton kernel can take these tensors (see :func:`rescale_unsupported_reason`)."""
    return rescale_unsupported_reason(delta_cfg, grad, allow_interpreter) is None


def rescale_unsupported_reason(delta_cfg: Tensor, grad: Tensor, allow_interpreter: bool = False) -> str | None:
    """Why the Triton kernel cannot take these tensors, or ``None`` when it can: triton
    importable, the kernel module shipped, both tensors on one CUDA device (CPU only with
    ``allow_interpreter`` under ``TRITON_INTERPRET=1``), dtypes float32/float16/bfloat16."""
    if grad.device != delta_cfg.device:
        return f"the gradient is on {grad.device} but Δcfg on {delta_cfg.device}"
    device_reason = launch_unsupported_reason("rescale_norms", delta_cfg, allow_interpreter)
    if device_reason is not None:
        return device_reason
    for name, tensor in (("delta_cfg", delta_cfg), ("grad", grad)):
        if tensor.dtype not in _TRITON_DTYPES:
            return f"{name} has dtype {tensor.dtype}, not one of {_TRITON_DTYPES}"
    return None


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------


def _check_inputs(delta_cfg: Tensor, grad: Tensor, lo: float, hi: float, backend: str) -> None:
    """Raise :class:`InputError` naming the argument and value unless every input is usable."""
    for name, tensor in (("delta_cfg", delta_cfg), ("grad", grad)):
        if not isinstance(tensor, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if delta_cfg.dim() < 1 or delta_cfg.numel() == 0:
        raise InputError(f"delta_cfg must be a non-empty [B, ...] tensor, got shape {tuple(delta_cfg.shape)}")
    if grad.shape != delta_cfg.shape:
        raise InputError(f"grad must have the shape of delta_cfg {tuple(delta_cfg.shape)}, got {tuple(grad.shape)}")
    for name, bound in (("lo", lo), ("hi", hi)):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise InputError(f"{name} must be a finite positive number, got {bound!r}")
    if lo > hi:
        raise InputError(f"lo must be at most hi, got lo={lo!r}, hi={hi!r}")
    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def rescale_path(delta_cfg: Tensor, grad: Tensor, backend: Backend = "auto") -> Literal["triton", "torch"]:
    """``"triton"`` or ``"torch"`` for these tensors and ``backend`` (``"auto"``: Triton when
    :func:`rescale_triton_supported` holds), logged once per (path, reason); raises
    :class:`BackendUnavailableError` when a forced Triton path cannot run."""
    return choose_path(  # type: ignore[return-value]
        logger, "rescale_gammas", backend, [("triton", lambda forced: rescale_unsupported_reason(delta_cfg, grad, forced))]
    )


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------


@torch.library.triton_op("gnr_fast::rescale_gamma", mutates_args=())
def _rescale_gamma_op(delta_cfg: Tensor, grad: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """(γ [B], norms [B, 2]) float32 of one launch, one program per image. Callers check
    :func:`rescale_unsupported_reason` first."""
    batch = delta_cfg.shape[0]
    values = delta_cfg.numel() // batch
    gamma = delta_cfg.new_empty(batch, dtype=torch.float32)
    norms = delta_cfg.new_empty(batch, 2, dtype=torch.float32)
    kernel = torch.library.wrap_triton(kernel_module("rescale_norms")._rescale_gamma_kernel)
    with on_device(delta_cfg.device):  # Triton launches on the current CUDA device, not the tensors'
        kernel[(batch,)](delta_cfg.contiguous(), grad.contiguous(), gamma, norms, values, lo, hi, BLOCK=_BLOCK)
    return gamma, norms
