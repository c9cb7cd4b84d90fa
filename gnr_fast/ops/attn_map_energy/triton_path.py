"""The Triton path of the attention-map energy: torch ops around ``kernels/attn_map_energy.py``."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from gnr_fast.devices import on_device
from gnr_fast.ops.kernel_args import DOT_PRECISION, cdiv, next_power_of_2
from gnr_fast.ops.triton_kernels import kernel_module


def _kernel_module() -> ModuleType:
    """``kernels/attn_map_energy.py`` for the current ``TRITON_INTERPRET`` setting."""
    return kernel_module("attn_map_energy")


# (BLOCK_M, BLOCK_N, pipeline stages) by (input is float32, padded head dim), all with 8 warps.
# Chosen by compiling the three kernels with triton 3.9 (no GPU was available to time them) and
# keeping the largest tiles whose ptxas register spills were zero or smallest: float32 inputs hold
# q and q_ref as split tf32x3 operands and need short row blocks. Every row needs at most 99 KiB of
# shared memory, the per-block limit of sm_86 / sm_89 GPUs (A10, L4; benchmarks/kernel_resources.py,
# held in CI): float32 at head dim 256 runs unpipelined (three stages took 128 KiB). It still
# spills there (~200-400 B/thread for sm_90); tune these on a GPU.
_BLOCKS: dict[tuple[bool, int], tuple[int, int, int]] = {
    (False, 64): (32, 64, 3),
    (False, 128): (32, 32, 3),
    (False, 256): (32, 32, 3),
    (True, 64): (16, 64, 3),
    (True, 128): (16, 32, 3),
    (True, 256): (16, 16, 1),
}
_NUM_WARPS = 8


def _launch_config(tokens: int, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes, warps and stages for one launch: BLOCK_D is the head dim padded to a power of two
    (at least 16, ``tl.dot``'s minimum, and at least 64, the smallest table row); BLOCK_M/BLOCK_N
    come from :data:`_BLOCKS`, shrunk for short sequences but never below 16."""
    block_d = max(16, next_power_of_2(head_dim))
    block_m, block_n, stages = _BLOCKS[(dtype == torch.float32, max(64, block_d))]
    fit = max(16, next_power_of_2(tokens))
    return {"BLOCK_M": min(block_m, fit), "BLOCK_N": min(block_n, fit), "BLOCK_D": block_d, "num_warps": _NUM_WARPS,
            "num_stages": stages}


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
    grid = (cdiv(tokens, config["BLOCK_M"]), batch * heads)
    with on_device(q.device):  # Triton launches on the current CUDA device, not q's
        _kernel_module()._attn_map_energy_fwd_kernel[grid](
            q, k, q_ref, k_ref, lse_ref, lse, row_sq, row_dot, scale, tokens, head_dim,
            DOT_PRECISION=DOT_PRECISION, **config,
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
        kernels._attn_map_energy_bwd_dq_kernel[(cdiv(tokens, config["BLOCK_M"]), batch * heads)](
            *inputs, dq, scale, tokens, head_dim, DOT_PRECISION=DOT_PRECISION, **config
        )
        kernels._attn_map_energy_bwd_dk_kernel[(cdiv(tokens, config["BLOCK_N"]), batch * heads)](
            *inputs, dk, scale, tokens, head_dim, DOT_PRECISION=DOT_PRECISION, **config
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


class TritonAttnMapEnergy(torch.autograd.Function):
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
