"""Feature energies of the guiders, energy and gradient in one pass, per image (DESIGN.md §4).

With current-pass features Φ and source-pass features Φ* of a batch ([B, ...], one image per
row), d = Φ − Φ* and M values per image::

    "l1" (appearance, self_attn_map_l2_appearance):  E_b = mean |d|    ∂E_b/∂Φ = sign(d) / M
    "l2" (features_map_l2, stylisation):             E_b = mean d²     ∂E_b/∂Φ = 2 d / M

Layers, as in STYLE.md rule 3:

- :func:`feature_energy_ref` — the pure-torch formula, per image, differentiable by autograd.
- :func:`feature_energy` — the public op: per-image energies [B] float32. On CUDA with Triton
  (:func:`feature_energy_triton_supported`) one kernel (``kernels/feature_energy.py``, the
  ``torch.library.triton_op`` ``gnr_fast::feature_energy_fwd``) reads Φ and Φ* once and writes
  the energy partials and the gradient; autograd's backward only scales that saved gradient by
  the upstream one. Elsewhere it is :func:`feature_energy_ref`.
- :func:`mean_feature_energy` — what the guiders call: the energy as one mean over the whole
  batch (a 0-dim tensor). Off the Triton path it is exactly the guiders' former expression
  ``mean(|to_compute(Φ) − to_compute(Φ*)|)`` (resp. ``(…)²``), so CPU results are bit-identical
  to it and golden parity is unchanged.

Gradients flow to Φ and, if it requires grad, to Φ* (the negation); all arithmetic is float32
(float64 stays on the torch path), gradients come back in each input's dtype (docs/precision.md).
"""

from __future__ import annotations

import logging
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
from gnr_fast.precision import to_compute

logger = logging.getLogger(__name__)

Kind = Literal["l1", "l2"]
Backend = Literal["auto", "torch", "triton"]
_KINDS = ("l1", "l2")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TORCH_DTYPES = (*_TRITON_DTYPES, torch.float64)
# Values per program: a feature map of SD 1.x at 512² (320·64·64 values) gives 320 programs.
_BLOCK = 4096


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _difference_term(cur: Tensor, inv: Tensor, kind: str) -> Tensor:
    """|d| or d² in the compute dtype (float32; float64 stays), d = Φ − Φ*."""
    diff = to_compute(cur) - to_compute(inv)
    return torch.abs(diff) if kind == "l1" else diff**2


def feature_energy_ref(cur: Tensor, inv: Tensor, kind: Kind) -> Tensor:
    """Per-image energies [B]: mean over each image's values of |Φ − Φ*| ("l1") or (Φ − Φ*)²
    ("l2"), float32 (float64 for float64 inputs). Differentiable by autograd."""
    return _difference_term(cur, inv, kind).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def feature_energy(cur: Tensor, inv: Tensor, kind: Kind, backend: Backend = "auto") -> Tensor:
    """Per-image feature energies of a batch, the gradient computed in the same pass.

    Args:
        cur: Φ, [B, ...] (one image per row), float32/float16/bfloat16 (float64 on the torch
            path); gradients are returned for it.
        inv: Φ*, the source pass's features, same shape, dtype and device.
        kind: ``"l1"`` (mean |Φ − Φ*|, the appearance energy) or ``"l2"`` (mean (Φ − Φ*)², the
            features-map energy).
        backend: ``"auto"`` takes the Triton kernel when :func:`feature_energy_triton_supported`
            holds, else the torch reference; ``"torch"``/``"triton"`` force one (``"triton"``
            raises :class:`BackendUnavailableError` with the reason; on CPU it runs only under
            ``TRITON_INTERPRET=1``).

    Returns:
        [B] float32 (float64 for float64 inputs) energies, differentiable w.r.t. ``cur`` and
        ``inv`` (first order); equal to :func:`feature_energy_ref` up to summation order.

    Raises:
        InputError: shapes, dtypes, devices, ``kind`` or ``backend`` are invalid.
    """
    _check_inputs(cur, inv, kind, backend)
    if _choose(cur, backend) == "triton":
        return _TritonFeatureEnergy.apply(cur, inv, kind)
    return feature_energy_ref(cur, inv, kind)


def mean_feature_energy(cur: Tensor, inv: Tensor, kind: Kind) -> Tensor:
    """The energy over the whole batch as one mean (0-dim float32; float64 for float64 inputs):
    the value the guiders use. Triton path when :func:`feature_energy_triton_supported` holds
    (the mean of the per-image energies, all images being one size); otherwise the torch
    expression ``mean(|Φ − Φ*|)`` / ``mean((Φ − Φ*)²)`` over everything, bit for bit as before."""
    _check_inputs(cur, inv, kind, "auto")
    if _choose(cur, "auto") == "triton":
        return _TritonFeatureEnergy.apply(cur, inv, kind).mean()
    return torch.mean(_difference_term(cur, inv, kind))


def feature_energy_triton_supported(cur: Tensor, allow_interpreter: bool = False) -> bool:
    """True when the Triton kernel can take ``cur`` (see :func:`feature_energy_unsupported_reason`)."""
    return feature_energy_unsupported_reason(cur, allow_interpreter) is None


def feature_energy_unsupported_reason(cur: Tensor, allow_interpreter: bool = False) -> str | None:
    """Why the Triton kernel cannot take ``cur``, or ``None`` when it can: triton importable, the
    kernel module shipped, a CUDA tensor (a CPU tensor only with ``allow_interpreter`` under
    ``TRITON_INTERPRET=1``) of dtype float32/float16/bfloat16."""
    device_reason = launch_unsupported_reason("feature_energy", cur, allow_interpreter)
    if device_reason is not None:
        return device_reason
    if cur.dtype not in _TRITON_DTYPES:
        return f"dtype {cur.dtype} is not one of {_TRITON_DTYPES}"
    return None


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------


def _check_inputs(cur: Tensor, inv: Tensor, kind: str, backend: str) -> None:
    """Raise :class:`InputError` naming the argument and value unless every input is usable."""
    for name, tensor in (("cur", cur), ("inv", inv)):
        if not isinstance(tensor, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if cur.dim() < 1 or cur.numel() == 0:
        raise InputError(f"cur must be a non-empty [B, ...] tensor, got shape {tuple(cur.shape)}")
    if inv.shape != cur.shape:
        raise InputError(f"inv must have the shape of cur {tuple(cur.shape)}, got {tuple(inv.shape)}")
    if cur.dtype not in _TORCH_DTYPES or inv.dtype != cur.dtype:
        raise InputError(f"cur and inv must share one of {_TORCH_DTYPES}, got {cur.dtype} and {inv.dtype}")
    if inv.device != cur.device:
        raise InputError(f"inv is on {inv.device} but cur is on {cur.device}; move them to one device")
    if kind not in _KINDS:
        raise InputError(f"kind must be 'l1' or 'l2', got {kind!r}")
    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def _choose(cur: Tensor, backend: str) -> str:
    """``"triton"`` or ``"torch"`` for ``backend`` (:func:`~gnr_fast.ops.path_choice.choose_path`)."""
    return choose_path(
        logger, "feature_energy", backend, [("triton", lambda forced: feature_energy_unsupported_reason(cur, forced))]
    )


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------


class _TritonFeatureEnergy(torch.autograd.Function):
    """Per-image energies by the fused kernel; the gradient it wrote is saved and scaled in
    backward by each image's upstream gradient (for Φ*: its negation)."""

    @staticmethod
    def forward(ctx, cur: Tensor, inv: Tensor, kind: str):  # type: ignore[override]
        energy, grad = torch.ops.gnr_fast.feature_energy_fwd(cur.detach(), inv.detach(), kind == "l2")
        ctx.save_for_backward(grad)
        ctx.inv_dtype = inv.dtype
        return energy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_energy: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors  # [B, ...] in cur's dtype, ∂E_b/∂Φ
        scale = grad_energy.float().reshape(-1, *([1] * (grad.dim() - 1)))  # [B, 1, ...]
        grad_cur = grad.float() * scale if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None
        d_cur = grad_cur.to(grad.dtype) if ctx.needs_input_grad[0] else None
        d_inv = (-grad_cur).to(ctx.inv_dtype) if ctx.needs_input_grad[1] else None
        return d_cur, d_inv, None


@torch.library.triton_op("gnr_fast::feature_energy_fwd", mutates_args=())
def _feature_energy_fwd_op(cur: Tensor, inv: Tensor, squared: bool) -> tuple[Tensor, Tensor]:
    """(energies [B] float32, ∂E_b/∂Φ in cur's dtype and shape) of one launch over Φ and Φ*
    (``squared``: the "l2" energy, else "l1"). Callers check the support predicate first."""
    batch = cur.shape[0]
    values = cur.numel() // batch
    cur_c, inv_c = cur.contiguous(), inv.contiguous()
    blocks = -(-values // _BLOCK)
    partial = cur.new_empty(batch, blocks, dtype=torch.float32)
    grad = torch.empty_like(cur_c)
    kernel = torch.library.wrap_triton(kernel_module("feature_energy")._feature_energy_kernel)
    with on_device(cur.device):  # Triton launches on the current CUDA device, not the tensors'
        kernel[(blocks, batch)](
            cur_c, inv_c, partial, grad, values, 1.0 / values, blocks, BLOCK=_BLOCK, SQUARED=squared
        )
    return partial.sum(dim=1) / values, grad
