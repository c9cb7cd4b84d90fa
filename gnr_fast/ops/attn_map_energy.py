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
  predicates, the Triton kernels (``kernels/attn_map_energy.py``, registered as the torch ops
  ``gnr_fast::attn_map_energy_fwd`` / ``gnr_fast::attn_map_energy_bwd``) or the chunked
  pure-torch :class:`_ChunkedAttnMapEnergy`. Both keep O(chunk·N + N·D) memory and recompute the
  maps in backward from per-row statistics (flash-attention style).
- :func:`attention_lse` — chunked per-row log-sum-exp, so capture code can produce ``lse_ref``
  without an N×N map.

Backward math (M = B·H·N·N, g = ∂L/∂E, D_i = Σ_j A_ij (A_ij − A_ref_ij))::

    dS_ij = (2 g / M) · A_ij · ((A_ij − A_ref_ij) − D_i)
    dq    = scale · dS k ,   dk = scale · dSᵀ q

D_i is computed in the forward sweep (it costs nothing there) and saved with the row
log-sum-exp, two [B, H, N] vectors, so backward needs one sweep per gradient.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from gnr_fast.errors import BackendUnavailableError, InputError

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "triton"]

# A chunk of query rows materialises [B, H, chunk, N] score tiles; the default chunk keeps one
# tile at about 16 M floats (64 MiB in fp32), 1/8 of one SD 1.x N=4096, H=8 map (DESIGN.md §8).
TILE_BUDGET_FLOATS = 16 * 2**20

# dtypes each path accepts. The torch path computes in float32 (float64 for float64 inputs).
_TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims of SD 1.x/2.x self-attention are 40, 64, 80, 160; one padded key tile must fit on chip.
_TRITON_MAX_HEAD_DIM = 256

_KERNEL_PATH = Path(__file__).resolve().parents[2] / "kernels" / "attn_map_energy.py"


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
        chunk: query rows per step of the torch path; ``None`` keeps one [B, H, chunk, N] tile at
            about :data:`TILE_BUDGET_FLOATS` floats. Ignored by the Triton path (it tiles itself).
        backend: ``"auto"`` uses the Triton kernels when :func:`triton_supported` holds, else the
            chunked torch path; ``"torch"`` / ``"triton"`` force one (``"triton"`` raises
            :class:`BackendUnavailableError` with the reason when unsupported; on CPU it works
            only under ``TRITON_INTERPRET=1``).

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs), equal to :func:`attn_map_energy_ref`
        up to summation order, differentiable w.r.t. ``q`` and ``k`` (first order only).

    Raises:
        InputError: a tensor has the wrong shape, dtype or device, or ``scale``/``chunk``/
            ``backend`` is invalid.
        BackendUnavailableError: ``backend="triton"`` but :func:`triton_unsupported_reason`
            gives a reason.
    """
    _check_inputs(q, k, q_ref, k_ref, lse_ref, scale, chunk, backend)
    scale = _resolve_scale(q, scale)
    q_ref, k_ref, lse_ref = q_ref.detach(), k_ref.detach(), lse_ref.detach()

    use_triton = _select_backend(q, backend)
    if use_triton:
        return _TritonAttnMapEnergy.apply(q, k, q_ref, k_ref, lse_ref, scale)
    batch, heads, tokens, _ = q.shape
    chunk = chunk if chunk is not None else default_chunk(batch, heads, tokens)
    return _ChunkedAttnMapEnergy.apply(q, k, q_ref, k_ref, lse_ref, scale, chunk)


@torch.no_grad()
def attention_lse(q: Tensor, k: Tensor, scale: float | None = None, chunk: int | None = None) -> Tensor:
    """Per-row ``logsumexp(scale · q kᵀ, dim=-1)`` computed chunk by chunk, [B, H, N] float32.

    Memory is one [B, H, chunk, N] score tile plus float32 copies of k; no gradient is recorded
    (the result is a source-pass constant). float64 inputs give a float64 result. ``q`` and ``k``
    may have different token counts (``q``: [B, H, N, D], ``k``: [B, H, L, D]).

    Raises:
        InputError: shapes, dtypes or devices do not match, or ``scale``/``chunk`` is invalid.
    """
    _check_lse_inputs(q, k, scale, chunk)
    scale = _resolve_scale(q, scale)
    batch, heads, tokens, _ = q.shape
    chunk = chunk if chunk is not None else default_chunk(batch, heads, k.shape[2])
    dtype = _compute_dtype(q)
    keys = k.to(dtype)  # [B, H, L, D]
    lse = torch.empty(batch, heads, tokens, dtype=dtype, device=q.device)  # [B, H, N]
    for start in range(0, tokens, chunk):
        rows = slice(start, min(start + chunk, tokens))
        lse[:, :, rows] = torch.logsumexp(_scores(q[:, :, rows], keys, scale), dim=-1)
    return lse


def default_chunk(batch: int, heads: int, tokens: int) -> int:
    """Query rows per chunk so that one [batch, heads, chunk, tokens] tile holds at most
    :data:`TILE_BUDGET_FLOATS` floats (at least 1 row, at most ``tokens``)."""
    return max(1, min(tokens, TILE_BUDGET_FLOATS // max(1, batch * heads * tokens)))


def triton_supported(q: Tensor, allow_interpreter: bool = False) -> bool:
    """True when the Triton kernels can compute the energy for ``q`` (see
    :func:`triton_unsupported_reason`)."""
    return triton_unsupported_reason(q, allow_interpreter) is None


def triton_unsupported_reason(q: Tensor, allow_interpreter: bool = False) -> str | None:
    """Why the Triton kernels cannot take ``q`` ([B, H, N, D]), or ``None`` when they can.

    Requirements: triton importable, the kernel source ``kernels/attn_map_energy.py`` present (a
    source checkout), a CUDA tensor — or, with ``allow_interpreter``, a CPU tensor while
    ``TRITON_INTERPRET=1`` — dtype float32/float16/bfloat16 (not bfloat16 under the interpreter,
    whose ``tl.dot`` does not support it) and head dim ≤ 256.
    """
    if not triton_importable():
        return "triton is not installed (pip install 'gnr-fast[kernels]')"
    if not _KERNEL_PATH.is_file():
        return f"the kernel source {_KERNEL_PATH} is missing (Triton kernels need a source checkout)"
    if q.device.type == "cpu":
        if not allow_interpreter:
            return "tensors are on the CPU; the Triton kernels run on CUDA (on CPU only forced, under TRITON_INTERPRET=1)"
        if not triton_interpreting():
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        if not _interpreter_ready():
            return (
                "TRITON_INTERPRET=1 was set after triton.language had been imported in compiled mode; "
                "set it before the first import of triton (e.g. in the environment)"
            )
    elif q.device.type != "cuda":
        return f"tensors are on {q.device.type}; the Triton kernels run on CUDA"
    elif triton_interpreting() or _interpreter_ready():
        return "TRITON_INTERPRET=1 is (or was, when triton was imported) set; interpreted kernels take CPU tensors only"
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} is not one of {_TRITON_DTYPES}"
    if q.dtype == torch.bfloat16 and triton_interpreting():
        return "the Triton interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584)"
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} exceeds {_TRITON_MAX_HEAD_DIM}"
    return None


def triton_importable() -> bool:
    """True when the ``triton`` package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` is in effect (kernels then run on CPU tensors)."""
    if not triton_importable():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def _interpreter_ready() -> bool:
    """True when triton.language was imported under the interpreter. Its own helpers (``tl.zeros``,
    ``tl.sum``, ...) are ``@triton.jit`` functions built at import, and interpreted kernels can
    only call interpreted helpers."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


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
    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


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
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            raise InputError(f"scale must be a finite non-zero float (or None for D**-0.5), got {scale!r}")
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InputError(f"chunk must be a positive int (or None for the default), got {chunk!r}")


_logged_choices: set[tuple[str, str]] = set()


def _select_backend(q: Tensor, backend: str) -> bool:
    """True for the Triton path. Decides by :func:`triton_unsupported_reason`, logs each distinct
    choice once, and raises :class:`BackendUnavailableError` when ``"triton"`` is forced but
    unsupported."""
    reason = triton_unsupported_reason(q, allow_interpreter=backend == "triton")
    if backend == "triton" and reason is not None:
        raise BackendUnavailableError(f"attn_map_energy: backend='triton' is unavailable: {reason}")
    use_triton = backend != "torch" and reason is None
    choice = ("triton", "supported") if use_triton else ("torch", reason or f"backend={backend!r}")
    if choice not in _logged_choices:
        _logged_choices.add(choice)
        logger.info("attn_map_energy uses the %s path (%s)", *choice)
    return use_triton


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


def _maps_chunk(
    q_rows: Tensor, keys: Tensor, q_ref_rows: Tensor, keys_ref: Tensor, lse_ref_rows: Tensor, scale: float,
    lse_rows: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A, A − A_ref and the row log-sum-exp for one chunk of query rows.

    ``lse_rows`` ([B, H, c]) is recomputed when None. Returns (A [B,H,c,N], A − A_ref [B,H,c,N],
    lse [B,H,c]).
    """
    scores = _scores(q_rows, keys, scale)  # [B, H, c, N]
    if lse_rows is None:
        lse_rows = torch.logsumexp(scores, dim=-1)  # [B, H, c]
    attn = scores.sub_(lse_rows[..., None]).exp_()  # A, in place of the scores
    attn_ref = _scores(q_ref_rows, keys_ref, scale).sub_(lse_ref_rows[..., None]).exp_()  # A_ref
    diff = attn_ref.neg_().add_(attn)  # A − A_ref, in place of A_ref
    return attn, diff, lse_rows


class _ChunkedAttnMapEnergy(torch.autograd.Function):
    """Energy and its q/k gradients, one chunk of query rows at a time.

    Forward keeps one chunk's [B, H, chunk, N] maps alive at a time and saves q, k, the source
    tensors and two [B, H, N] row statistics (log-sum-exp, D_i); backward recomputes each chunk.
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
    ) -> Tensor:
        batch, heads, tokens, _ = q.shape
        dtype = _compute_dtype(q)
        keys, keys_ref = k.to(dtype), k_ref.to(dtype)  # [B, H, N, D]
        lse = torch.empty(batch, heads, tokens, dtype=dtype, device=q.device)  # [B, H, N]
        row_dot = torch.empty_like(lse)  # D_i = Σ_j A_ij (A_ij − A_ref_ij), [B, H, N]
        total = torch.zeros((), dtype=dtype, device=q.device)
        for start in range(0, tokens, chunk):
            rows = slice(start, min(start + chunk, tokens))
            attn, diff, lse_rows = _maps_chunk(
                q[:, :, rows], keys, q_ref[:, :, rows], keys_ref, lse_ref[:, :, rows], scale, None
            )
            lse[:, :, rows] = lse_rows
            row_dot[:, :, rows] = (attn * diff).sum(dim=-1)
            total += diff.square().sum()
        ctx.save_for_backward(q, k, q_ref, k_ref, lse_ref, lse, row_dot)
        ctx.scale, ctx.chunk = scale, chunk
        return total / (batch * heads * tokens * tokens)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_energy: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, q_ref, k_ref, lse_ref, lse, row_dot = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        batch, heads, tokens, _ = q.shape
        dtype = _compute_dtype(q)
        keys, keys_ref = k.to(dtype), k_ref.to(dtype)  # [B, H, N, D]
        dq = torch.empty(q.shape, dtype=dtype, device=q.device)  # [B, H, N, D]
        dk = torch.zeros(k.shape, dtype=dtype, device=k.device)  # [B, H, N, D]
        for start in range(0, tokens, chunk):
            rows = slice(start, min(start + chunk, tokens))
            q_rows = q[:, :, rows].to(dtype)  # [B, H, c, D]
            attn, diff, _ = _maps_chunk(
                q_rows, keys, q_ref[:, :, rows], keys_ref, lse_ref[:, :, rows], scale, lse[:, :, rows]
            )
            grad_scores = attn.mul_(diff.sub_(row_dot[:, :, rows, None]))  # A ⊙ (A − A_ref − D), [B,H,c,N]
            dq[:, :, rows] = grad_scores @ keys
            dk += grad_scores.transpose(-1, -2) @ q_rows
        # dS = (2 g / M) · A ⊙ (A − A_ref − D); dq = scale · dS k; dk = scale · dSᵀ q.
        coef = grad_energy.to(dtype) * (2.0 * scale / (batch * heads * tokens * tokens))
        dq = (dq * coef).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = (dk * coef).to(k.dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Triton path: torch ops around kernels/attn_map_energy.py
# --------------------------------------------------------------------------------------------

_kernel_modules: dict[bool, ModuleType] = {}


def _kernel_module() -> ModuleType:
    """``kernels/attn_map_energy.py`` loaded for the current ``TRITON_INTERPRET`` setting.

    ``@triton.jit`` decides at import whether it builds GPU or interpreted kernels, so one module
    instance is kept per setting (the source lives outside the package, in ``kernels/``).
    """
    interpreted = triton_interpreting()
    if interpreted not in _kernel_modules:
        name = "gnr_fast_kernels_attn_map_energy" + ("_interpreted" if interpreted else "")
        spec = importlib.util.spec_from_file_location(name, _KERNEL_PATH)
        assert spec is not None and spec.loader is not None, _KERNEL_PATH
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _kernel_modules[interpreted] = module
    return _kernel_modules[interpreted]


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
