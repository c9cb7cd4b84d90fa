"""The materialised self-attention-map L2 energy: the numerical reference of every other path."""

from __future__ import annotations

import torch
from torch import Tensor

from gnr_fast.ops.kernel_args import compute_dtype, softmax_scale


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
    scale = softmax_scale(q, scale)
    dtype = compute_dtype(q)
    attn = torch.softmax(scale * (q.to(dtype) @ k.to(dtype).transpose(-1, -2)), dim=-1)  # [B,H,N,N]
    scores_ref = scale * (q_ref.detach().to(dtype) @ k_ref.detach().to(dtype).transpose(-1, -2))
    attn_ref = torch.exp(scores_ref - lse_ref.detach().to(dtype)[..., None])  # [B, H, N, N]
    return ((attn - attn_ref) ** 2).mean()
