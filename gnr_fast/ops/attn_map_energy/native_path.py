"""The native path of the attention-map energy: the C++ CPU kernels of ``csrc/`` (:mod:`gnr_fast.ops.native`)."""

from __future__ import annotations

import torch
from torch import Tensor

from gnr_fast.ops import native


class NativeAttnMapEnergy(torch.autograd.Function):
    """Energy through ``gnr_fast_native::attn_map_energy_fwd/bwd`` (float32 C++ kernels).

    Half inputs are upcast to float32 on entry. Gradient strategies as in
    :class:`ChunkedAttnMapEnergy`: ``fuse_grad`` computes the gradient sums in the forward sweep
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
