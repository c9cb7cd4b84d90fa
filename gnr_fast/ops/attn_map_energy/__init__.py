"""Self-attention-map L2 energy without materialising attention maps (DESIGN.md §4, §8).

For one self-attention layer, with the current pass (q, k) and the source pass (q_ref, k_ref,
lse_ref)::

    A     = softmax(scale · q kᵀ)                      # [B, H, N, N], never stored
    A_ref = exp(scale · q_ref k_refᵀ − lse_ref)        # [B, H, N, N], never stored
    E     = mean((A − A_ref)²)                          # over all B·H·N·N entries

Gradients flow to q and k only; the source pass is a constant (DESIGN.md §8).

One module per implementation, as in STYLE.md rule 3:

- :mod:`.reference` — :func:`attn_map_energy_ref`, the materialised formula, the numerical reference.
- :mod:`.chunked` — the chunked pure-torch path (:class:`~.chunked.ChunkedAttnMapEnergy`).
- :mod:`.triton_path` — the Triton kernels (``kernels/attn_map_energy.py``, shipped as
  ``gnr_fast.kernels``, registered as the torch ops ``gnr_fast::attn_map_energy_fwd`` /
  ``gnr_fast::attn_map_energy_bwd``), for CUDA tensors.
- :mod:`.native_path` — the C++ CPU kernels (``csrc/``, torch ops ``gnr_fast_native::*``, see
  :mod:`gnr_fast.ops.native`), for CPU tensors.
- this module — :func:`attn_map_energy`, the public entry point: validates its inputs and picks
  the path by named predicates (:func:`triton_unsupported_reason`, :func:`native_unsupported_reason`)
  through :func:`gnr_fast.ops.path_choice.choose_path`. All keep O(chunk·N + N·D) memory and never
  hold a [B, H, N, N] map.

The chunked per-row log-sum-exp that produces ``lse_ref`` without an N×N map is
:func:`gnr_fast.ops.attention_lse.attention_lse`.

Backward math (M = B·H·N·N, g = ∂L/∂E, D_i = Σ_j A_ij (A_ij − A_ref_ij))::

    dS_ij = (2 g / M) · A_ij · ((A_ij − A_ref_ij) − D_i)
    dq    = scale · dS k ,   dk = scale · dSᵀ q

Each chunk of query rows holds complete rows of A and A_ref, so D_i is available in the same
chunk as dS. Two ways to get the gradient (both give the same bits):

- fused (torch path, the default when autograd needs the gradient): the forward sweep also
  computes dq and dk for g = 1 and saves them, 2·[B, H, N, D]; backward only multiplies by g.
  A guided edit differentiates the energy right after computing it, once per step, so this does
  one sweep over the maps per step instead of two.
- recomputing (``recompute=True``, forward without gradient, and the Triton path): forward
  saves the inputs and the per-row D_i ([B, H, N]); backward recomputes A and A_ref chunk by
  chunk (flash-attention style). Nothing is spent on a gradient that is never asked for.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor

from gnr_fast.errors import InputError
from gnr_fast.ops import native
from gnr_fast.ops.attn_map_energy.chunked import ChunkedAttnMapEnergy
from gnr_fast.ops.attn_map_energy.native_path import NativeAttnMapEnergy
from gnr_fast.ops.attn_map_energy.reference import attn_map_energy_ref
from gnr_fast.ops.attn_map_energy.triton_path import TritonAttnMapEnergy
from gnr_fast.ops.kernel_args import check_scale_and_chunk, default_chunk, softmax_scale
from gnr_fast.ops.path_choice import choose_path
from gnr_fast.ops.triton_kernels import launch_unsupported_reason, triton_interpreting

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "triton", "native"]

# dtypes each path accepts. The torch path computes in float32 (float64 for float64 inputs).
_TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims of SD 1.x/2.x self-attention are 40, 64, 80, 160; one padded key tile must fit on chip.
_TRITON_MAX_HEAD_DIM = 256

# dtypes the native C++ path takes (half inputs are upcast to float32 on entry).
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def attn_map_energy(
    q: Tensor,
    k: Tensor,
    q_ref: Tensor,
    k_ref: Tensor,
    lse_ref: Tensor,
    scale: float | None = None,
    chunk: int | None = None,
    backend: Backend = "auto",
    recompute: bool = False,
) -> Tensor:
    """Self-attention-map L2 energy ``mean((A − A_ref)²)`` without materialising A or A_ref.

    Args:
        q, k: current-pass queries and keys, [B, H, N, D], float32/float16/bfloat16 (float64 on
            the torch path); gradients are returned for these.
        q_ref, k_ref: source-pass queries and keys, same shape, dtype and device as ``q``; treated
            as constants (detached).
        lse_ref: [B, H, N] float32 (float64 with float64 ``q``): per-row log-sum-exp of
            ``scale · q_ref k_refᵀ``, e.g. from :func:`attention_lse`.
        scale: softmax scale; ``None`` means ``D ** -0.5``.
        chunk: query rows per step of the torch path; ``None`` means :func:`default_chunk` (one
            [B, H, chunk, N] tile of about :data:`CPU_TILE_BUDGET_FLOATS` floats, at least
            :data:`CPU_MIN_CHUNK_ROWS` rows, on CPU; :data:`TILE_BUDGET_FLOATS` elsewhere). The
            torch path holds two such tiles at a time.
            Ignored by the Triton path (it tiles itself).
        backend: ``"auto"`` uses the Triton kernels when :func:`triton_supported` holds, else the
            C++ kernels when :func:`native_supported` holds, else the chunked torch path;
            ``"torch"`` / ``"triton"`` / ``"native"`` force one (``"triton"`` and ``"native"``
            raise :class:`BackendUnavailableError` with the reason when unsupported; on CPU
            ``"triton"`` works only under ``TRITON_INTERPRET=1``).
        recompute: torch and native paths. ``False`` (default): when autograd needs the gradient (grad
            mode on and ``q`` or ``k`` requires grad), the forward sweep computes it too and
            backward just scales it — the fast choice when the energy is differentiated once
            right after it is computed, as in a guided edit step; when no backward follows it
            costs 1.6–1.9× a plain forward (measured on CPU), and 2·[B, H, N, D] extra memory
            until backward. ``True``: forward saves per-row statistics only and backward
            recomputes the maps (flash-attention style). Gradients are identical either way.
            The Triton path always recomputes. ``chunk`` is the native path's rows per tile
            (``None``: the kernel's default).

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs), equal to :func:`attn_map_energy_ref`
        up to summation order, differentiable w.r.t. ``q`` and ``k`` (first order only).

    Raises:
        InputError: a tensor has the wrong shape, dtype or device, or ``scale``/``chunk``/
            ``backend``/``recompute`` is invalid.
        BackendUnavailableError: ``backend="triton"`` but :func:`triton_unsupported_reason`
            gives a reason.
    """
    _check_inputs(q, k, q_ref, k_ref, lse_ref, scale, chunk, backend, recompute)
    scale = softmax_scale(q, scale)
    q_ref, k_ref, lse_ref = q_ref.detach(), k_ref.detach(), lse_ref.detach()

    path = _select_backend(q, backend)
    if path == "triton":
        return TritonAttnMapEnergy.apply(q, k, q_ref, k_ref, lse_ref, scale)
    fuse_grad = not recompute and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if path == "native":
        return NativeAttnMapEnergy.apply(q, k, q_ref, k_ref, lse_ref, scale, chunk or 0, fuse_grad)
    batch, heads, tokens, _ = q.shape
    chunk = chunk if chunk is not None else default_chunk(batch, heads, tokens, q.device)
    return ChunkedAttnMapEnergy.apply(q, k, q_ref, k_ref, lse_ref, scale, chunk, fuse_grad)


def triton_supported(q: Tensor, allow_interpreter: bool = False) -> bool:
    """True when the Triton kernels can compute the energy for ``q`` (see
    :func:`triton_unsupported_reason`)."""
    return triton_unsupported_reason(q, allow_interpreter) is None


def triton_unsupported_reason(q: Tensor, allow_interpreter: bool = False) -> str | None:
    """Why the Triton kernels cannot take ``q`` ([B, H, N, D]), or ``None`` when they can.

    Requirements: triton importable, the kernel module ``gnr_fast.kernels.attn_map_energy``
    present (the installed copy of ``kernels/attn_map_energy.py``), a CUDA tensor — or, with ``allow_interpreter``, a CPU tensor while
    ``TRITON_INTERPRET=1`` — dtype float32/float16/bfloat16 (not bfloat16 under the interpreter,
    whose ``tl.dot`` does not support it) and head dim ≤ 256.
    """
    device_reason = launch_unsupported_reason("attn_map_energy", q, allow_interpreter)
    if device_reason is not None:
        return device_reason
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} is not one of {_TRITON_DTYPES}"
    if q.dtype == torch.bfloat16 and triton_interpreting():
        return "the Triton interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584)"
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} exceeds {_TRITON_MAX_HEAD_DIM}"
    return None


def native_supported(q: Tensor) -> bool:
    """True when the C++ CPU kernels can take ``q`` (see :func:`native_unsupported_reason`)."""
    return native_unsupported_reason(q) is None


def native_unsupported_reason(q: Tensor) -> str | None:
    """Why the C++ kernels cannot take ``q`` ([B, H, N, D]), or ``None`` when they can: a CPU
    tensor of dtype float32/float16/bfloat16 (halves are upcast to float32) and the native
    library loaded (:func:`gnr_fast.ops.native.native_unavailable_reason`)."""
    if q.device.type != "cpu":
        return f"tensors are on {q.device.type}; the native kernels run on CPU"
    if q.dtype not in _NATIVE_DTYPES:
        return f"dtype {q.dtype} is not one of {_NATIVE_DTYPES}"
    return native.native_unavailable_reason()


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------


def _check_inputs(
    q: Tensor,
    k: Tensor,
    q_ref: Tensor,
    k_ref: Tensor,
    lse_ref: Tensor,
    scale: float | None,
    chunk: int | None,
    backend: str,
    recompute: bool,
) -> None:
    """Raise :class:`InputError` naming the argument and value unless every input is usable."""
    named = {"q": q, "k": k, "q_ref": q_ref, "k_ref": k_ref, "lse_ref": lse_ref}
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if q.dim() != 4:
        raise InputError(f"q must be [B, H, N, D] (4 dims), got shape {tuple(q.shape)}")
    if q.numel() == 0:
        raise InputError(f"q must not be empty, got shape {tuple(q.shape)}")
    for name in ("k", "q_ref", "k_ref"):
        if named[name].shape != q.shape:
            raise InputError(
                f"{name} must have the shape of q {tuple(q.shape)} (self-attention), "
                f"got {tuple(named[name].shape)}"
            )
    if lse_ref.shape != q.shape[:3]:
        raise InputError(
            f"lse_ref must be [B, H, N] = {tuple(q.shape[:3])}, got {tuple(lse_ref.shape)}; "
            "compute it with attention_lse(q_ref, k_ref)"
        )
    if q.dtype not in _TORCH_DTYPES:
        raise InputError(f"q has dtype {q.dtype}; use one of {_TORCH_DTYPES}")
    for name in ("k", "q_ref", "k_ref"):
        if named[name].dtype != q.dtype:
            raise InputError(f"{name} has dtype {named[name].dtype} but q has {q.dtype}; cast them to one dtype")
    expected_lse = torch.float64 if q.dtype == torch.float64 else torch.float32
    if lse_ref.dtype != expected_lse:
        raise InputError(f"lse_ref must be {expected_lse} for q of dtype {q.dtype}, got {lse_ref.dtype}")
    for name, tensor in named.items():
        if tensor.device != q.device:
            raise InputError(f"{name} is on {tensor.device} but q is on {q.device}; move them to one device")
    check_scale_and_chunk(scale, chunk)
    if backend not in ("auto", "torch", "triton", "native"):
        raise InputError(f"backend must be 'auto', 'torch', 'triton' or 'native', got {backend!r}")
    if not isinstance(recompute, bool):
        raise InputError(f"recompute must be True or False, got {recompute!r}")


def _select_backend(q: Tensor, backend: str) -> str:
    """``"triton"``, ``"native"`` or ``"torch"`` (:func:`~gnr_fast.ops.path_choice.choose_path`
    with :func:`triton_unsupported_reason` and :func:`native_unsupported_reason`)."""
    paths = [("triton", lambda forced: triton_unsupported_reason(q, allow_interpreter=forced)),
             ("native", lambda forced: native_unsupported_reason(q))]
    return choose_path(logger, "attn_map_energy", backend, paths)
