"""The chunked pure-torch path of the attention-map energy: one chunk of query rows at a time,
O(chunk·N + N·D) memory (the sweep and backward math: :mod:`gnr_fast.ops.attn_map_energy`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from gnr_fast.ops.kernel_args import compute_dtype


def scores(q_rows: Tensor, keys: Tensor, scale: float) -> Tensor:
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
    dtype = compute_dtype(q)
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


class ChunkedAttnMapEnergy(torch.autograd.Function):
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
        ctx.dtypes, ctx.compute_dtype = (q.dtype, k.dtype), compute_dtype(q)
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
