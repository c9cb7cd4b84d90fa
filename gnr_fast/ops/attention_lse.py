"""Attention output and per-row log-sum-exp in one call, for the capture processors (DESIGN.md §8).

    out = softmax(scale · q kᵀ) v          # [B, H, N, DV]
    lse = logsumexp(scale · q kᵀ, dim=-1)  # [B, H, N], float32, natural log

:func:`attention_with_lse` is the one op the capturing attention calls: the source pass needs
lse* for the energy; in the grad call ``out`` is differentiable w.r.t. q, k, v, and so is
``lse`` (its gradient is carried: ∂lse_i/∂q_i = scale·(A k)_i, ∂lse_i/∂k_j = scale·A_ij q_i),
so an energy that reuses the grad call's lse instead of recomputing it gets the right gradient.

Implementations, chosen by named predicates and logged once (:func:`attention_lse_path`):

- ``"cpu_flash"``: ``aten._scaled_dot_product_flash_attention_for_cpu`` (CPU, v's head dim =
  q's; returns lse).
- ``"xformers"``: ``xformers.ops.fmha.memory_efficient_attention_forward_requires_grad`` (CUDA,
  where xformers is installed — the optional extra; imported lazily). Its [B, N, H, D] layout and
  the lse padding of some of its kernels are normalised here.
- ``"triton"``: the fused forward of ``kernels/attention_lse.py`` (CUDA; head dims up to 256,
  padded to powers of two; any token count), registered with ``torch.library.triton_op``.
- ``"sdpa"``: ``F.scaled_dot_product_attention`` plus the chunked lse of
  :func:`attention_lse` (everything else).

Every path's backward is the same (:class:`_AttentionWithLse`): the output's gradient by
re-running SDPA under autograd (or the CPU flash backward op), the lse's by two SDPA calls. lse
conventions (natural log vs log2, padding, [B, H, N] layout, float32) are fixed in this module
only.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gnr_fast.devices import on_device
from gnr_fast.errors import InputError
from gnr_fast.ops import native
from gnr_fast.ops.attn_map_energy import native_supported
from gnr_fast.ops.attn_map_energy.chunked import scores
from gnr_fast.ops.kernel_args import (
    DOT_PRECISION,
    cdiv,
    check_scale_and_chunk,
    compute_dtype,
    default_chunk,
    next_power_of_2,
    softmax_scale,
)
from gnr_fast.ops.path_choice import PathReason, choose_path
from gnr_fast.ops.triton_kernels import kernel_module, launch_unsupported_reason

logger = logging.getLogger(__name__)

Path = Literal["cpu_flash", "xformers", "triton", "sdpa"]
Backend = Literal["auto", "cpu_flash", "xformers", "triton", "sdpa"]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # Triton and xformers
_TRITON_MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def attention_with_lse_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Materialised ``(softmax(S) v, logsumexp(S))`` with S = scale·q kᵀ in float32 (float64 for
    float64 inputs); out in the input dtype, lse float32/float64. Differentiable by autograd."""
    scale = softmax_scale(q, scale)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scale * (q.to(dtype) @ k.to(dtype).transpose(-1, -2))  # [B, H, N, L]
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, N]
    out = torch.exp(scores - lse[..., None]) @ v.to(dtype)  # [B, H, N, DV]
    return out.to(q.dtype), lse


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, need_lse: bool = True, backend: Backend = "auto"
) -> tuple[Tensor, Tensor | None]:
    """Attention output and per-row log-sum-exp of the scores.

    Args:
        q: [B, H, N, D]; k: [B, H, L, D]; v: [B, H, L, DV] — one dtype (float32/float16/bfloat16;
            float64 on the ``"cpu_flash"`` and ``"sdpa"`` paths) and device.
        scale: softmax scale; ``None`` means ``D ** -0.5`` (passed on as ``None`` to the CPU flash
            kernel and to SDPA, which then use their own default, bit for bit as a direct call).
        need_lse: ``False`` returns ``(out, None)`` through plain SDPA (no lse work at all).
        backend: ``"auto"`` picks by :func:`attention_lse_path`; a named path forces it
            (:class:`BackendUnavailableError` with the reason when it cannot run here).

    Returns:
        ``(out, lse)``: out [B, H, N, DV] in q's dtype; lse [B, H, N] float32 (float64 for float64
        inputs), natural log.
        Both are differentiable w.r.t. q, k, v (first order); equal to
        :func:`attention_with_lse_ref` up to the path's rounding.

    Raises:
        InputError: shapes, dtypes, devices or ``scale``/``need_lse``/``backend`` are invalid.
    """
    _check_inputs(q, k, v, scale, need_lse, backend)
    if not need_lse:
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    path = _choose(q, k, v, backend)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # No gradient wanted (e.g. the source pass): the path's forward alone, no autograd node;
        # on CPU the very flash call a direct caller makes, which torch.compile traces as one op.
        return _forward(path, q, k, v, scale)
    out, lse = _AttentionWithLse.apply(q, k, v, scale, path)
    return out, lse


def attention_lse_path(q: Tensor, k: Tensor, v: Tensor) -> Path:
    """The implementation ``backend="auto"`` uses for these tensors (first that applies):
    CPU → ``"cpu_flash"``; CUDA with xformers installed → ``"xformers"``; CUDA with Triton →
    ``"triton"``; else ``"sdpa"``. Reasons per path: :func:`path_unavailable_reason`."""
    return next((name for name, reason_of in _kernel_paths(q, k, v) if reason_of(False) is None), "sdpa")


def _kernel_paths(q: Tensor, k: Tensor, v: Tensor) -> list[tuple[str, PathReason]]:
    """The kernels in order of preference with their predicates, for
    :func:`~gnr_fast.ops.path_choice.choose_path` (``"sdpa"`` is the fallback)."""

    def reason_of(path: Path, forced: bool) -> str | None:
        reason = path_unavailable_reason(path, q, k, v)
        if reason is None and path == "triton" and not forced and q.device.type != "cuda":
            return "the Triton interpreter (CPU tensors under TRITON_INTERPRET=1) is for tests: forced only"
        return reason

    return [(path, lambda forced, path=path: reason_of(path, forced)) for path in ("cpu_flash", "xformers", "triton")]


def path_unavailable_reason(path: Path, q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why ``path`` cannot compute attention for these tensors, or ``None`` when it can."""
    if path == "sdpa":
        return None
    if path == "cpu_flash":
        if q.device.type != "cpu":
            return f"tensors are on {q.device.type}, not the CPU"
        if v.shape[-1] != q.shape[-1]:
            return f"v's head dim {v.shape[-1]} differs from q's {q.shape[-1]} (the CPU flash kernel needs one)"
        return None
    if path == "xformers":
        if q.dtype not in _KERNEL_DTYPES:
            return f"dtype {q.dtype} is not one of {_KERNEL_DTYPES}"
        if q.device.type != "cuda":
            return f"tensors are on {q.device.type}; xformers runs on CUDA"
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed (optional: pip install xformers)"
        return None
    if path == "triton":
        return _triton_unavailable_reason(q, k, v)
    raise AssertionError(path)


def _triton_unavailable_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype} is not one of {_KERNEL_DTYPES}"
    launch = launch_unsupported_reason("attention_lse", q, allow_interpreter=True)
    if launch is not None:
        return launch
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "the Triton interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584)"
    if max(q.shape[-1], v.shape[-1]) > _TRITON_MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} exceeds {_TRITON_MAX_HEAD_DIM}"
    return None


@torch.no_grad()
def attention_lse(q: Tensor, k: Tensor, scale: float | None = None, chunk: int | None = None) -> Tensor:
    """Per-row ``logsumexp(scale · q kᵀ, dim=-1)`` computed chunk by chunk, [B, H, N] float32.

    Memory is one [B, H, chunk, N] score tile plus float32 copies of k; no gradient is recorded
    (the result is a source-pass constant). float64 inputs give a float64 result. ``q`` and ``k``
    may have different token counts (``q``: [B, H, N, D], ``k``: [B, H, L, D]). CPU tensors use
    the C++ kernel when :func:`native_supported` holds (``chunk``: its rows per tile).

    Raises:
        InputError: shapes, dtypes or devices do not match, or ``scale``/``chunk`` is invalid.
    """
    _check_lse_inputs(q, k, scale, chunk)
    scale = softmax_scale(q, scale)
    if native_supported(q):
        return native.attention_lse(q.float(), k.float(), scale, chunk or 0)
    batch, heads, tokens, _ = q.shape
    chunk = chunk if chunk is not None else default_chunk(batch, heads, k.shape[2], q.device)
    dtype = compute_dtype(q)
    keys = k.to(dtype)  # [B, H, L, D]
    lse = torch.empty(batch, heads, tokens, dtype=dtype, device=q.device)  # [B, H, N]
    for start in range(0, tokens, chunk):
        rows = slice(start, min(start + chunk, tokens))
        lse[:, :, rows] = torch.logsumexp(scores(q[:, :, rows], keys, scale), dim=-1)
    return lse


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float | None, need_lse: bool, backend: str) -> None:
    """Raise :class:`InputError` naming the argument and value unless every input is usable."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4 or tensor.numel() == 0:
            raise InputError(f"{name} must be a non-empty [B, H, tokens, dim] tensor, got shape {tuple(tensor.shape)}")
        if tensor.dtype not in _DTYPES or tensor.dtype != q.dtype:
            raise InputError(f"{name} has dtype {tensor.dtype}; q, k, v must share one of {_DTYPES}")
        if tensor.device != q.device:
            raise InputError(f"{name} is on {tensor.device} but q is on {q.device}; move them to one device")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise InputError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in B, H and D")
    if v.shape[:3] != k.shape[:3]:
        raise InputError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} in B, H and tokens")
    check_scale_and_chunk(scale, None)
    if not isinstance(need_lse, bool):
        raise InputError(f"need_lse must be True or False, got {need_lse!r}")
    if backend not in ("auto", "cpu_flash", "xformers", "triton", "sdpa"):
        raise InputError(f"backend must be 'auto', 'cpu_flash', 'xformers', 'triton' or 'sdpa', got {backend!r}")


def _check_lse_inputs(q: Tensor, k: Tensor, scale: float | None, chunk: int | None) -> None:
    """Raise :class:`InputError` unless ``attention_lse`` can use its inputs."""
    for name, tensor in (("q", q), ("k", k)):
        if not isinstance(tensor, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4 or tensor.numel() == 0:
            raise InputError(f"{name} must be a non-empty [B, H, N, D] tensor, got shape {tuple(tensor.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise InputError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in B, H and D")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise InputError(f"q and k must share one of {_DTYPES}, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise InputError(f"k is on {k.device} but q is on {q.device}; move them to one device")
    check_scale_and_chunk(scale, chunk)


def _choose(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Path:
    """The path for ``backend`` (:func:`~gnr_fast.ops.path_choice.choose_path`: raises when a forced
    one is unavailable, logs each choice once)."""
    return choose_path(logger, "attention_with_lse", backend, _kernel_paths(q, k, v), fallback="sdpa")  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Forward implementations: each returns (out [B, H, N, DV] in q's dtype, lse [B, H, N] float32)
# --------------------------------------------------------------------------------------------


def _forward(path: Path, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    """``scale=None``: the kernels' own default D**-0.5 (the CPU flash kernel and SDPA are called
    exactly as a direct call would; the other paths resolve it here)."""
    if path == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse if lse.dtype == torch.float64 else lse.float()
    if scale is None:
        scale = softmax_scale(q, scale)
    if path == "xformers":
        return _xformers_forward(q, k, v, scale)
    if path == "triton":
        out, lse = torch.ops.gnr_fast.attention_lse_fwd(q.contiguous(), k.contiguous(), v.contiguous(), scale)
        return out, lse
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    lse = attention_lse(q, k, scale=scale)
    return out, lse if lse.dtype == torch.float64 else lse.float()


def _xformers_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """xformers takes [B, tokens, H, dim] and returns lse [B, H, N'] with N' ≥ N (some kernels pad
    the query axis to a multiple of 32): transpose in, slice and upcast the lse out."""
    from xformers.ops import fmha

    out, lse = fmha.memory_efficient_attention_forward_requires_grad(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2), lse[:, :, : q.shape[2]].float()


class _AttentionWithLse(torch.autograd.Function):
    """(out, lse) by one path's forward; backward shared by all paths.

    grad wrt out: the CPU flash backward op for ``"cpu_flash"``; otherwise SDPA re-run under
    autograd (recompute; flash/efficient SDPA kernels on CUDA). grad wrt lse (g, [B, H, N]):
    dq = scale · g ⊙ (A k) = scale · g ⊙ SDPA(q, k, k); dk = scale · Aᵀ (g ⊙ q), the value
    gradient of SDPA(q, k, ·) for the output gradient g ⊙ q. Nothing [N, L] is stored.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float | None, path: str):  # type: ignore[override]
        out, lse = _forward(path, q, k, v, scale)  # type: ignore[arg-type]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.path = scale, path
        # An output nobody differentiates (the lse of a grad call whose energy recomputes it)
        # gets grad None, not zeros: its backward terms are skipped.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is not None and ctx.path == "cpu_flash":
            # The flash backward with the forward's own arguments (scale None stays None), as
            # autograd of a direct call runs it.
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out.contiguous(), q, k, v, out, lse, 0.0, False, scale=ctx.scale
            )
            if grad_lse is None:
                return gq, gk, gv, None, None
        scale = softmax_scale(q, ctx.scale)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros_like(q, dtype=acc)
        dk = torch.zeros_like(k, dtype=acc)
        dv = torch.zeros_like(v, dtype=acc)
        if grad_out is not None:
            if ctx.path != "cpu_flash":
                gq, gk, gv = _sdpa_vjp(q, k, v, grad_out, scale)
            dq += gq.to(acc)
            dk += gk.to(acc)
            dv += gv.to(acc)
        if grad_lse is not None:
            g = grad_lse.to(acc)[..., None]  # [B, H, N, 1]
            with torch.no_grad():
                attn_k = F.scaled_dot_product_attention(q, k, k, scale=scale)  # A k, [B, H, N, D]
            dq += scale * g * attn_k.to(acc)
            _, _, gk_v = _sdpa_vjp(q, k, k, (g * q.to(acc)).to(q.dtype), scale, values_only=True)
            dk += scale * gk_v.to(acc)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _sdpa_vjp(
    q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, scale: float, values_only: bool = False
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Gradients of ``SDPA(q, k, v)`` for output gradient ``grad_out`` (only v's when
    ``values_only``), by re-running SDPA under autograd."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(not values_only) for t in (q, k)] + [v.detach().requires_grad_()]
        out = F.scaled_dot_product_attention(*leaves, scale=scale)
        wanted = leaves[2:] if values_only else leaves
        grads = torch.autograd.grad(out, wanted, grad_out)
    return (None, None, grads[0]) if values_only else tuple(grads)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Triton path: a triton_op around kernels/attention_lse.py
# --------------------------------------------------------------------------------------------


def _launch_config(tokens: int, block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_M/BLOCK_N by padded head dim (smaller for float32, whose fp32 dots use split
    operands), shrunk for short sequences but never below 16 (``tl.dot``'s minimum). Every
    configuration needs at most 99 KiB of shared memory, the per-block limit of sm_86 / sm_89 GPUs
    (A10, L4), the smallest of those this engine targets (``benchmarks/kernel_resources.py``, held in
    CI): float32 beyond head dim 64 keeps two pipeline stages instead of three, and beyond 128 also
    16-key blocks (measured for sm_86: 104 KiB → 72 KiB at head dim 128, 164 KiB → 66 KiB at 256)."""
    block_m, block_n = (64, 64) if block_d <= 64 else (64, 32) if block_d <= 128 else (32, 32)
    num_stages = 3
    if dtype == torch.float32:
        block_m = max(16, block_m // 2)
        if block_d > 64:
            num_stages = 2
        if block_d > 128:
            block_n = 16
    fit = max(16, next_power_of_2(tokens))
    return {"BLOCK_M": min(block_m, fit), "BLOCK_N": min(block_n, fit), "num_warps": 4, "num_stages": num_stages}


@torch.library.triton_op("gnr_fast::attention_lse_fwd", mutates_args=())
def _attention_lse_fwd_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, H, N, DV] in q's dtype, lse [B, H, N] float32) of contiguous inputs by the Triton
    kernel; callers check :func:`path_unavailable_reason` first."""
    batch, heads, tokens, head_dim = q.shape
    keys, value_dim = k.shape[2], v.shape[3]
    out = q.new_empty(batch, heads, tokens, value_dim)
    lse = q.new_empty(batch, heads, tokens, dtype=torch.float32)
    block_d, block_dv = max(16, next_power_of_2(head_dim)), max(16, next_power_of_2(value_dim))
    config = _launch_config(keys, max(block_d, block_dv), q.dtype)
    grid = (cdiv(tokens, config["BLOCK_M"]), batch * heads)
    kernel = torch.library.wrap_triton(kernel_module("attention_lse")._attention_lse_fwd_kernel)
    with on_device(q.device):  # Triton launches on the current CUDA device, not q's
        kernel[grid](
            q, k, v, out, lse, scale, tokens, keys, head_dim, value_dim,
            BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_PRECISION=DOT_PRECISION, **config,
        )
    return out, lse
