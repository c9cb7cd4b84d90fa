"""Self-attention-map L2 energy without materialising attention maps (DESIGN.md §4, §8).

For one self-attention layer, with the current pass (q, k) and the source pass (q_ref, k_ref,
lse_ref)::

    A     = softmax(scale · q kᵀ)                      # [B, H, N, N], never stored
    A_ref = exp(scale · q_ref k_refᵀ − lse_ref)        # [B, H, N, N], never stored
    E     = mean((A − A_ref)²)                          # over all B·H·N·N entries

Gradients flow to q and k only; the source pass is a constant (DESIGN.md §8).

Layers, as in STYLE.md rule 3:

- :func:`attn_map_energy_ref` — the materialised formula, the numerical reference.
- :func:`attn_map_energy` — the public entry point: validates its inputs and picks, by named
  predicates, the Triton kernels (``kernels/attn_map_energy.py``, shipped as
  ``gnr_fast.kernels``, registered as the torch ops ``gnr_fast::attn_map_energy_fwd`` /
  ``gnr_fast::attn_map_energy_bwd``) on CUDA, the C++ CPU kernels (``csrc/``, torch ops
  ``gnr_fast_native::*``, see :mod:`gnr_fast.ops.native`) on CPU, or the chunked pure-torch
  :class:`_ChunkedAttnMapEnergy`. All keep O(chunk·N + N·D) memory and never hold a
  [B, H, N, N] map.
- :func:`attention_lse` — chunked per-row log-sum-exp, so capture code can produce ``lse_ref``
  without an N×N map.

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
import math
from types import ModuleType
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gnr_fast.devices import on_device
from gnr_fast.errors import BackendUnavailableError, InputError
from gnr_fast.ops import native
from gnr_fast.ops.path_choice import log_choice
from gnr_fast.ops.triton_kernels import (
    kernel_module,
    launch_unsupported_reason,
    triton_interpreting,
)

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "triton", "native"]

# A chunk of query rows materialises [B, H, chunk, N] tiles (two at a time on the torch path); the
# default chunk keeps one tile at about 16 M floats (64 MiB in fp32), 1/8 of one SD 1.x N=4096,
# H=8 map (DESIGN.md §8) ...
TILE_BUDGET_FLOATS = 16 * 2**20
# ... and for CPU tensors at about 0.5 M floats (2 MiB), but at least 64 query rows: tiles that
# stay in cache beat the 16 M-float default, while fewer rows make the matmuls inefficient.
# Fused forward + backward on one AVX-512 core (torch 2.13, benchmarks/bench_attn_map_energy.py
# shapes, min over rounds on a shared machine), by rows per chunk:
#   N=1024 B=1 H=4 D=8:   c=64 22 ms, c=128 24 ms, c=256 27 ms, c=1024 (4 M floats) 50 ms
#   N=1024 B=1 H=8 D=40:  c=64 78 ms, c=128 91 ms, c=512 117 ms, c=1024 141 ms
#   N=1024 B=2 H=8 D=40:  c=32 174 ms, c=64 140 ms, c=128 187 ms, c=1024 (16 M) 360 ms
#   N=4096 B=1 H=8 D=40:  c=16 2.20 s, c=32 1.69 s, c=64 1.61 s, c=128 1.62 s, c=512 (16 M) 1.94 s
#   N=4096 B=2 H=8 D=40:  c=16 3.93 s, c=32 3.49 s, c=64 3.51 s, c=128 4.58 s, c=256 (16 M) 5.07 s
# A CPU tile is therefore max(CPU_TILE_BUDGET_FLOATS, B·H·64·N) floats, and never above
# TILE_BUDGET_FLOATS.
CPU_TILE_BUDGET_FLOATS = 2**19
CPU_MIN_CHUNK_ROWS = 64

# dtypes each path accepts. The torch path computes in float32 (float64 for float64 inputs).
_TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims of SD 1.x/2.x self-attention are 40, 64, 80, 160; one padded key tile must fit on chip.
_TRITON_MAX_HEAD_DIM = 256

# dtypes the native C++ path takes (half inputs are upcast to float32 on entry).
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def attn_map_energy_ref(
    q: Tensor,
    k: Tensor,
    q_ref: Tensor,
    k_ref: Tensor,
    lse_ref: Tensor,
    scale: float | None = None,
) -> Tensor:
    """The materialised formula: ``mean((softmax(scale·q kᵀ) − exp(scale·q_ref k_refᵀ − lse_ref))²)``.

    Allocates several [B, H, N, N] maps; differentiable by autograd w.r.t. q and k (the source
    tensors are detached). Computes in float32 (float64 for float64 inputs) and returns a scalar
    of that dtype. This is the numerical reference for :func:`attn_map_energy`.
    """
    scale = _resolve_scale(q, scale)
    dtype = _compute_dtype(q)
    attn = torch.softmax(scale * (q.to(dtype) @ k.to(dtype).transpose(-1, -2)), dim=-1)  # [B,H,N,N]
    scores_ref = scale * (q_ref.detach().to(dtype) @ k_ref.detach().to(dtype).transpose(-1, -2))
    attn_ref = torch.exp(scores_ref - lse_ref.detach().to(dtype)[..., None])  # [B, H, N, N]
    return ((attn - attn_ref) ** 2).mean()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


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
    scale = _resolve_scale(q, scale)
    q_ref, k_ref, lse_ref = q_ref.detach(), k_ref.detach(), lse_ref.detach()

    path = _select_backend(q, backend)
    if path == "triton":
        return _TritonAttnMapEnergy.apply(q, k, q_ref, k_ref, lse_ref, scale)
    fuse_grad = not recompute and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if path == "native":
        return _NativeAttnMapEnergy.apply(q, k, q_ref, k_ref, lse_ref, scale, chunk or 0, fuse_grad)
    batch, heads, tokens, _ = q.shape
    chunk = chunk if chunk is not None else default_chunk(batch, heads, tokens, q.device)
    return _ChunkedAttnMapEnergy.apply(q, k, q_ref, k_ref, lse_ref, scale, chunk, fuse_grad)


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
    scale = _resolve_scale(q, scale)
    if native_supported(q):
        return native.attention_lse(q.float(), k.float(), scale, chunk or 0)
    batch, heads, tokens, _ = q.shape
    chunk = chunk if chunk is not None else default_chunk(batch, heads, k.shape[2], q.device)
    dtype = _compute_dtype(q)
    keys = k.to(dtype)  # [B, H, L, D]
    lse = torch.empty(batch, heads, tokens, dtype=dtype, device=q.device)  # [B, H, N]
    for start in range(0, tokens, chunk):
        rows = slice(start, min(start + chunk, tokens))
        lse[:, :, rows] = torch.logsumexp(_scores(q[:, :, rows], keys, scale), dim=-1)
    return lse


def default_chunk(batch: int, heads: int, tokens: int, device: torch.device | str | None = None) -> int:
    """Query rows per chunk (at least 1, at most ``tokens``) for [batch, heads, chunk, tokens] tiles.

    Other devices (and ``device=None``): the tile holds at most :data:`TILE_BUDGET_FLOATS` floats.
    CPU: about :data:`CPU_TILE_BUDGET_FLOATS` floats but at least :data:`CPU_MIN_CHUNK_ROWS` rows,
    still at most :data:`TILE_BUDGET_FLOATS` floats (measurements beside the constants).
    """
    row_floats = max(1, batch * heads * tokens)
    rows = TILE_BUDGET_FLOATS // row_floats
    if device is not None and torch.device(device).type == "cpu":
        rows = min(rows, max(CPU_MIN_CHUNK_ROWS, CPU_TILE_BUDGET_FLOATS // row_floats))
    return max(1, min(tokens, rows))


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
    _check_scale_and_chunk(scale, chunk)
    if backend not in ("auto", "torch", "triton", "native"):
        raise InputError(f"backend must be 'auto', 'torch', 'triton' or 'native', got {backend!r}")
    if not isinstance(recompute, bool):
        raise InputError(f"recompute must be True or False, got {recompute!r}")


def _check_lse_inputs(q: Tensor, k: Tensor, scale: float | None, chunk: int | None) -> None:
    """Raise :class:`InputError` unless ``attention_lse`` can use its inputs."""
    for name, tensor in (("q", q), ("k", k)):
        if not isinstance(tensor, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4 or tensor.numel() == 0:
            raise InputError(f"{name} must be a non-empty [B, H, N, D] tensor, got shape {tuple(tensor.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise InputError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in B, H and D")
    if q.dtype not in _TORCH_DTYPES or k.dtype != q.dtype:
        raise InputError(f"q and k must share one of {_TORCH_DTYPES}, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise InputError(f"k is on {k.device} but q is on {q.device}; move them to one device")
    _check_scale_and_chunk(scale, chunk)


def _check_scale_and_chunk(scale: float | None, chunk: int | None) -> None:
    """Raise :class:`InputError` unless ``scale`` is None or a finite non-zero number and
    ``chunk`` is None or a positive int."""
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0
    ):
        raise InputError(f"scale must be a finite non-zero float (or None for D**-0.5), got {scale!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"chunk must be a positive int (or None for the default), got {chunk!r}")


def _select_backend(q: Tensor, backend: str) -> str:
    """``"triton"``, ``"native"`` or ``"torch"``. Decides by :func:`triton_unsupported_reason` and
    :func:`native_unsupported_reason`, logs each distinct choice once, and raises
    :class:`BackendUnavailableError` when a forced path is unsupported."""
    if backend == "torch":
        return _log_choice("torch", "backend='torch'")
    triton_reason = triton_unsupported_reason(q, allow_interpreter=backend == "triton")
    if backend == "triton" and triton_reason is not None:
        raise BackendUnavailableError(f"attn_map_energy: backend='triton' is unavailable: {triton_reason}")
    if backend != "native" and triton_reason is None:
        return _log_choice("triton", "supported")
    native_reason = native_unsupported_reason(q)
    if backend == "native" and native_reason is not None:
        raise BackendUnavailableError(f"attn_map_energy: backend='native' is unavailable: {native_reason}")
    if native_reason is None:
        return _log_choice("native", "supported" if backend == "native" else f"Triton: {triton_reason}")
    return _log_choice("torch", f"Triton: {triton_reason}; native: {native_reason}")


def _log_choice(path: str, why: str) -> str:
    return log_choice(logger, "attn_map_energy", path, why)


def _resolve_scale(q: Tensor, scale: float | None) -> float:
    """The softmax scale: ``scale`` itself, or ``D ** -0.5`` for ``q`` of shape [..., D]."""
    return float(scale) if scale is not None else q.shape[-1] ** -0.5


def _compute_dtype(q: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (softmax statistics are never kept in halves)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Chunked pure-torch path
# --------------------------------------------------------------------------------------------


def _scores(q_rows: Tensor, keys: Tensor, scale: float) -> Tensor:
    """``scale · q_rows keysᵀ`` in the dtype of ``keys``: [B, H, c, D] × [B, H, N, D] → [B, H, c, N]."""
    return torch.matmul(q_rows.to(keys.dtype), keys.transpose(-1, -2)).mul_(scale)


# exp(x) = 2^(x · log₂e). A_ref is computed as exp2(scale·log₂e · q_ref k_refᵀ − log₂e · lse_ref),
# both factors folded into one baddbmm: on one AVX-512 core (torch 2.13) torch.exp2 takes 0.32 ms
# per 2**20 float32 values and torch.exp 0.88 ms. Accuracy is unchanged: the rounding of the
# float32 exponent argument (~1e-6 relative at |argument| ~ 20, present either way) dominates.
_LOG2_E = math.log2(math.e)


class _Sweep(NamedTuple):
    """What one pass over the query-row chunks returns (``None`` where not requested).

    ``row_sq``: Σ_j (A − A_ref)²_ij, [B·H, N]. ``row_dot``: D_i = Σ_j A_ij (A − A_ref)_ij, [B·H, N].
    ``dq_t`` and ``dk_t``, [B·H, D, N] (transposed): Σ_j P_ij k_j and Σ_i P_ij q_i with
    P = A ⊙ ((A − A_ref) − D), i.e. the gradients before the factor 2·scale·g / M.
    """

    row_sq: Tensor | None
    row_dot: Tensor | None
    dq_t: Tensor | None
    dk_t: Tensor | None


def _sweep(
    q: Tensor,
    k: Tensor,
    q_ref: Tensor,
    k_ref: Tensor,
    lse_ref: Tensor,
    scale: float,
    chunk: int,
    *,
    energy: bool,
    need_row_dot: bool = False,
    need_dq: bool = False,
    need_dk: bool = False,
    row_dot: Tensor | None = None,
) -> _Sweep:
    """One sweep over chunks of ``chunk`` query rows of [B, H, N, D] inputs (see :class:`_Sweep`).

    ``energy``: return ``row_sq``. ``need_row_dot``: return ``row_dot`` (computed in the sweep, or
    ``row_dot`` itself when given). ``need_dq``/``need_dk``: return the gradient sums; D_i comes
    from ``row_dot`` when given (recomputing backward), else from the same chunk (fused sweep —
    each chunk holds complete rows of A and A_ref, so D_i needs no second pass).

    Per chunk of c rows, with T = [B·H, c, N] tiles in two buffers reused across chunks::

        attn  ← softmax(scale · q_c kᵀ)                          (baddbmm, alpha=scale; in place)
        diff  ← exp2(log₂e · (scale · q_ref_c k_refᵀ − lse_ref_c))   (baddbmm, alpha, beta=1)
        diff  ← attn − diff;  row_sq_c = Σ_j diff²
        diff  ← attn ⊙ diff;  D_c = Σ_j diff;  diff ← diff − D_c ⊙ attn        (= P_c)
        dq_t[:, :, c] = kᵀ P_cᵀ;  dk_t += q_cᵀ P_c

    Both gradient products put the head dim on the output's row axis ([D, ·] outputs): for a
    2**20-float tile at D = 8, MKL takes 1.2 ms for P k but 0.5 ms for kᵀ Pᵀ, and 3.1 ms for
    Pᵀ q_c but 0.3 ms for q_cᵀ P. ``softmax`` and ``sub`` write over one of their inputs; both
    are elementwise in that operand, which makes the aliasing safe.

    Memory: two tiles of B·H·c·N floats plus O(B·H·N·D); no [B, H, N, N] tensor.
    """
    batch, heads, tokens, head_dim = q.shape
    dtype = _compute_dtype(q)
    rows_total = batch * heads
    # [B·H, N, D] views (copies only for non-contiguous or half inputs).
    queries, keys, queries_ref, keys_ref = (
        t.to(dtype).reshape(rows_total, tokens, head_dim) for t in (q, k, q_ref, k_ref)
    )
    neg_lse_ref2 = lse_ref.to(dtype).reshape(rows_total, tokens, 1) * -_LOG2_E  # −log₂e · lse_ref, [B·H, N, 1]
    grads = need_dq or need_dk
    like = {"device": q.device, "dtype": dtype}
    row_sq = torch.empty(rows_total, tokens, **like) if energy else None  # [B·H, N]
    if need_row_dot and row_dot is None:
        row_dot_out: Tensor | None = torch.empty(rows_total, tokens, **like)  # [B·H, N]
    else:
        row_dot_out = row_dot if need_row_dot else None
    dq_t = torch.empty(rows_total, head_dim, tokens, **like) if need_dq else None  # [B·H, D, N]
    dk_t = torch.zeros(rows_total, head_dim, tokens, **like) if need_dk else None  # [B·H, D, N]

    chunk = min(chunk, tokens)
    attn_buf = torch.empty(rows_total * chunk * tokens, **like)  # one tile, reused per chunk
    diff_buf = torch.empty_like(attn_buf)
    keys_t, keys_ref_t = keys.transpose(1, 2), keys_ref.transpose(1, 2)  # [B·H, D, N] views
    for start in range(0, tokens, chunk):
        rows = slice(start, min(start + chunk, tokens))
        tile = (rows_total, rows.stop - start, tokens)
        attn = attn_buf[: math.prod(tile)].view(tile)  # [B·H, c, N]
        diff = diff_buf[: math.prod(tile)].view(tile)  # [B·H, c, N]
        q_rows = queries[:, rows]  # [B·H, c, D]
        torch.baddbmm(attn, q_rows, keys_t, beta=0, alpha=scale, out=attn)
        torch.softmax(attn, dim=-1, out=attn)  # A
        torch.baddbmm(neg_lse_ref2[:, rows], queries_ref[:, rows], keys_ref_t, alpha=scale * _LOG2_E, out=diff)
        diff.exp2_()  # A_ref
        torch.sub(attn, diff, out=diff)  # A − A_ref
        if row_sq is not None:
            row_sq[:, rows] = torch.linalg.vecdot(diff, diff)
        if not grads and row_dot_out is None:
            continue
        grad_scores = diff.mul_(attn)  # A ⊙ (A − A_ref)
        if row_dot is None:
            row_dot_rows = grad_scores.sum(dim=-1, keepdim=True)  # D_i, [B·H, c, 1]
            if row_dot_out is not None:
                row_dot_out[:, rows] = row_dot_rows[..., 0]
        else:
            row_dot_rows = row_dot[:, rows, None]
        if not grads:
            continue
        grad_scores.addcmul_(attn, row_dot_rows, value=-1)  # P = A ⊙ ((A − A_ref) − D)
        if dq_t is not None:
            dq_t[:, :, rows] = torch.bmm(keys_t, grad_scores.transpose(1, 2))
        if dk_t is not None:
            dk_t.baddbmm_(q_rows.transpose(1, 2), grad_scores)
    return _Sweep(row_sq, row_dot_out, dq_t, dk_t)


def _unflatten_grads(sweep: _Sweep, shape: torch.Size) -> tuple[Tensor | None, Tensor | None]:
    """The sweep's gradient sums as contiguous [B, H, N, D] tensors (copied out of [B·H, D, N])."""
    dq, dk = (None if t is None else t.transpose(1, 2).contiguous().view(shape) for t in (sweep.dq_t, sweep.dk_t))
    return dq, dk


class _ChunkedAttnMapEnergy(torch.autograd.Function):
    """Energy and its q/k gradients, one chunk of query rows at a time (see :func:`_sweep`).

    Two ways to get the gradient, chosen by the caller (``fuse_grad``):

    - fused (``fuse_grad=True``, used when autograd needs q/k gradients and ``recompute=False``):
      the forward sweep also computes the gradient for ∂L/∂E = 1 and saves it, 2·[B, H, N, D];
      backward only scales it by the incoming gradient. One sweep per step instead of two.
    - recomputing (``fuse_grad=False``): forward saves q, k, the source tensors and D_i
      ([B, H, N]); backward recomputes A and A_ref chunk by chunk (flash-attention style).
      Nothing is spent on gradients that are never asked for.

    Both give bitwise-identical gradients (same per-chunk operations in the same order).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        q_ref: Tensor,
        k_ref: Tensor,
        lse_ref: Tensor,
        scale: float,
        chunk: int,
        fuse_grad: bool,
    ) -> Tensor:
        batch, heads, tokens, _ = q.shape
        # Grad mode is off inside forward; requires_grad still tells which gradients autograd wants.
        want_dq, want_dk = q.requires_grad, k.requires_grad
        fused = fuse_grad and (want_dq or want_dk)
        sweep = _sweep(
            q, k, q_ref, k_ref, lse_ref, scale, chunk, energy=True,
            need_row_dot=not fused and (want_dq or want_dk),
            need_dq=fused and want_dq, need_dk=fused and want_dk,
        )
        ctx.fused = fused
        if fused:
            ctx.save_for_backward(*_unflatten_grads(sweep, q.shape))
        else:
            ctx.save_for_backward(q, k, q_ref, k_ref, lse_ref, sweep.row_dot)
        ctx.scale, ctx.chunk, ctx.shape = scale, chunk, q.shape
        ctx.dtypes, ctx.compute_dtype = (q.dtype, k.dtype), _compute_dtype(q)
        return sweep.row_sq.sum() / (batch * heads * tokens * tokens)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_energy: Tensor
    ) -> tuple[Tensor | None, ...]:
        need_dq, need_dk = ctx.needs_input_grad[:2]
        if ctx.fused:
            dq, dk = ctx.saved_tensors
        else:
            q, k, q_ref, k_ref, lse_ref, row_dot = ctx.saved_tensors
            sweep = _sweep(
                q, k, q_ref, k_ref, lse_ref, ctx.scale, ctx.chunk, energy=False,
                need_dq=need_dq, need_dk=need_dk, row_dot=row_dot,
            )
            dq, dk = _unflatten_grads(sweep, q.shape)
        # dS = (2 g / M) · P; dq = scale · dS k; dk = scale · dSᵀ q.
        batch, heads, tokens, _ = ctx.shape
        coef = grad_energy.to(ctx.compute_dtype) * (2.0 * ctx.scale / (batch * heads * tokens * tokens))
        dq = (dq * coef).to(ctx.dtypes[0]) if need_dq else None
        dk = (dk * coef).to(ctx.dtypes[1]) if need_dk else None
        return dq, dk, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Triton path: torch ops around kernels/attn_map_energy.py
# --------------------------------------------------------------------------------------------

def _kernel_module() -> ModuleType:
    """``kernels/attn_map_energy.py`` for the current ``TRITON_INTERPRET`` setting."""
    return kernel_module("attn_map_energy")


# (BLOCK_M, BLOCK_N) by (input is float32, padded head dim), all with 8 warps. Chosen by compiling
# the three kernels for sm_90 with triton 3.9 (no GPU was available to time them) and keeping
# the largest tiles whose ptxas register spills were zero or smallest: float32 inputs hold q and
# q_ref as split tf32x3 operands and need short row blocks. float32 with head dim > 128 still
# spills (~200-700 B/thread); tune these on a GPU.
_BLOCKS: dict[tuple[bool, int], tuple[int, int]] = {
    (False, 64): (32, 64),
    (False, 128): (32, 32),
    (False, 256): (32, 32),
    (True, 64): (16, 64),
    (True, 128): (16, 32),
    (True, 256): (16, 16),
}
_NUM_WARPS = 8


def _launch_config(tokens: int, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and warps for one launch: BLOCK_D is the head dim padded to a power of two
    (at least 16, ``tl.dot``'s minimum, and at least 64, the smallest table row); BLOCK_M/BLOCK_N
    come from :data:`_BLOCKS`, shrunk for short sequences but never below 16."""
    block_d = max(16, _next_power_of_2(head_dim))
    block_m, block_n = _BLOCKS[(dtype == torch.float32, max(64, block_d))]
    fit = max(16, _next_power_of_2(tokens))
    return {"BLOCK_M": min(block_m, fit), "BLOCK_N": min(block_n, fit), "BLOCK_D": block_d, "num_warps": _NUM_WARPS}


def _next_power_of_2(n: int) -> int:
    """Smallest power of two ≥ n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()


# Precision of the dots with float32 operands (all scores for float32 inputs; the dS products for
# every dtype): "tf32x3" runs on tensor cores at about float32 accuracy. Plain "tf32" truncates
# operands to 10 mantissa bits (biased), too coarse for A − A_ref, which partly cancels; "ieee"
# spilled thousands of bytes per thread in the sm_90 compile. The interpreter computes every dot
# in float32 regardless.
_DOT_PRECISION = "tf32x3"


# Registered as opaque custom ops with shape-only fake twins rather than with
# ``torch.library.triton_op``: triton_op uses the launching function itself as the fake kernel,
# which under ``TRITON_INTERPRET=1`` runs the interpreter on fake tensors and fails, so the op
# could not be checked on CPU. The two kernels are whole sweeps; torch.compile has nothing to
# fuse into them.


@torch.library.custom_op("gnr_fast::attn_map_energy_fwd", mutates_args=())
def _attn_map_energy_fwd_op(
    q: Tensor, k: Tensor, q_ref: Tensor, k_ref: Tensor, lse_ref: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row statistics (row_sq, lse, row_dot), each [B, H, N] float32, of contiguous
    [B, H, N, D] inputs: row_sq_i = Σ_j (A − A_ref)²_ij, the log-sum-exp of the current scores,
    and row_dot_i = Σ_j A_ij (A − A_ref)_ij. Callers check :func:`triton_supported` first."""
    batch, heads, tokens, head_dim = q.shape
    row_sq, lse, row_dot = _attn_map_energy_fwd_fake(q, k, q_ref, k_ref, lse_ref, scale)
    config = _launch_config(tokens, head_dim, q.dtype)
    grid = (_cdiv(tokens, config["BLOCK_M"]), batch * heads)
    with on_device(q.device):  # Triton launches on the current CUDA device, not q's
        _kernel_module()._attn_map_energy_fwd_kernel[grid](
            q, k, q_ref, k_ref, lse_ref, lse, row_sq, row_dot, scale, tokens, head_dim,
            DOT_PRECISION=_DOT_PRECISION, **config,
        )
    return row_sq, lse, row_dot


@_attn_map_energy_fwd_op.register_fake
def _attn_map_energy_fwd_fake(
    q: Tensor, k: Tensor, q_ref: Tensor, k_ref: Tensor, lse_ref: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised (row_sq, lse, row_dot), each [B, H, N] float32 on q's device."""
    batch, heads, tokens, _ = q.shape
    row_sq = q.new_empty(batch, heads, tokens, dtype=torch.float32)
    return row_sq, torch.empty_like(row_sq), torch.empty_like(row_sq)


@torch.library.custom_op("gnr_fast::attn_map_energy_bwd", mutates_args=())
def _attn_map_energy_bwd_op(
    q: Tensor,
    k: Tensor,
    q_ref: Tensor,
    k_ref: Tensor,
    lse_ref: Tensor,
    lse: Tensor,
    row_dot: Tensor,
    grad_row_sq: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """(dq, dk), [B, H, N, D] in the dtype of q, for per-row output gradients
    ``grad_row_sq`` = ∂L/∂row_sq ([B, H, N] float32), from the forward op's statistics."""
    batch, heads, tokens, head_dim = q.shape
    dq, dk = _attn_map_energy_bwd_fake(q, k, q_ref, k_ref, lse_ref, lse, row_dot, grad_row_sq, scale)
    config = _launch_config(tokens, head_dim, q.dtype)
    inputs = (q, k, q_ref, k_ref, lse_ref, lse, row_dot, grad_row_sq)
    kernels = _kernel_module()
    with on_device(q.device):  # Triton launches on the current CUDA device, not q's
        kernels._attn_map_energy_bwd_dq_kernel[(_cdiv(tokens, config["BLOCK_M"]), batch * heads)](
            *inputs, dq, scale, tokens, head_dim, DOT_PRECISION=_DOT_PRECISION, **config
        )
        kernels._attn_map_energy_bwd_dk_kernel[(_cdiv(tokens, config["BLOCK_N"]), batch * heads)](
            *inputs, dk, scale, tokens, head_dim, DOT_PRECISION=_DOT_PRECISION, **config
        )
    return dq, dk


@_attn_map_energy_bwd_op.register_fake
def _attn_map_energy_bwd_fake(
    q: Tensor,
    k: Tensor,
    q_ref: Tensor,
    k_ref: Tensor,
    lse_ref: Tensor,
    lse: Tensor,
    row_dot: Tensor,
    grad_row_sq: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Uninitialised (dq, dk) shaped and typed like (q, k)."""
    return torch.empty_like(q), torch.empty_like(k)


def _cdiv(n: int, d: int) -> int:
    """⌈n / d⌉ for positive ints."""
    return -(-n // d)


class _TritonAttnMapEnergy(torch.autograd.Function):
    """Energy through the ``gnr_fast::attn_map_energy_fwd/bwd`` ops (Triton kernels).

    Saves q, k, the source tensors and the [B, H, N] float32 statistics (lse, row_dot).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        q_ref: Tensor,
        k_ref: Tensor,
        lse_ref: Tensor,
        scale: float,
    ) -> Tensor:
        q, k, q_ref, k_ref, lse_ref = (t.contiguous() for t in (q, k, q_ref, k_ref, lse_ref))
        row_sq, lse, row_dot = torch.ops.gnr_fast.attn_map_energy_fwd(q, k, q_ref, k_ref, lse_ref, scale)
        ctx.save_for_backward(q, k, q_ref, k_ref, lse_ref, lse, row_dot)
        ctx.scale = scale
        return row_sq.sum() / row_sq.numel() / q.shape[2]  # Σ / (B·H·N·N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_energy: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, q_ref, k_ref, lse_ref, lse, row_dot = ctx.saved_tensors
        batch, heads, tokens, _ = q.shape
        grad_row_sq = (grad_energy.float() / (batch * heads * tokens * tokens)).expand(batch, heads, tokens)
        dq, dk = torch.ops.gnr_fast.attn_map_energy_bwd(
            q, k, q_ref, k_ref, lse_ref, lse, row_dot, grad_row_sq.contiguous(), ctx.scale
        )
        return dq, dk, None, None, None, None


# --------------------------------------------------------------------------------------------
# Native path: the C++ CPU kernels of csrc/ (gnr_fast.ops.native)
# --------------------------------------------------------------------------------------------


class _NativeAttnMapEnergy(torch.autograd.Function):
    """Energy through ``gnr_fast_native::attn_map_energy_fwd/bwd`` (float32 C++ kernels).

    Half inputs are upcast to float32 on entry. Gradient strategies as in
    :class:`_ChunkedAttnMapEnergy`: ``fuse_grad`` computes the gradient sums in the forward sweep
    and saves them; otherwise forward saves the inputs and row_dot and backward recomputes.
    The gradient is accumulated and scaled in float32 and rounded to the input dtype once.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        q_ref: Tensor,
        k_ref: Tensor,
        lse_ref: Tensor,
        scale: float,
        block_rows: int,
        fuse_grad: bool,
    ) -> Tensor:
        fused = fuse_grad and (q.requires_grad or k.requires_grad)
        q32, k32, q_ref32, k_ref32 = (t.float() for t in (q, k, q_ref, k_ref))
        row_sq, row_dot, dq_sum, dk_sum = native.attn_map_energy_fwd(
            q32, k32, q_ref32, k_ref32, lse_ref, scale, fused, block_rows
        )
        ctx.fused = fused
        if fused:
            ctx.save_for_backward(dq_sum, dk_sum)
        else:
            ctx.save_for_backward(q32, k32, q_ref32, k_ref32, lse_ref, row_dot)
        ctx.scale, ctx.block_rows, ctx.shape, ctx.dtypes = scale, block_rows, q.shape, (q.dtype, k.dtype)
        batch, heads, tokens, _ = q.shape
        return row_sq.sum() / (batch * heads * tokens * tokens)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_energy: Tensor
    ) -> tuple[Tensor | None, ...]:
        need_dq, need_dk = ctx.needs_input_grad[:2]
        if ctx.fused:
            dq, dk = ctx.saved_tensors
        else:
            dq, dk = native.attn_map_energy_bwd(*ctx.saved_tensors, ctx.scale, ctx.block_rows)
        batch, heads, tokens, _ = ctx.shape
        coef = grad_energy.float() * (2.0 * ctx.scale / (batch * heads * tokens * tokens))
        dq = (dq * coef).to(ctx.dtypes[0]) if need_dq else None
        dk = (dk * coef).to(ctx.dtypes[1]) if need_dk else None
        return dq, dk, None, None, None, None, None, None
