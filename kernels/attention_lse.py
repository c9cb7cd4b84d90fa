"""Triton kernel: attention output and per-row log-sum-exp in one pass (flash-attention forward).

For one (batch·head) with Q [N, D], K [L, D], V [L, DV]:

    S = scale · Q Kᵀ,  lse_i = log Σ_j exp(S_ij)  (natural log),  O = exp(S − lse) V

Every program owns one block of BLOCK_M query rows and sweeps the keys in blocks of BLOCK_N with
an online max/sum (m_i, l_i), so no [N, L] tile is ever stored. Head dims are padded to powers of
two (BLOCK_D, BLOCK_DV; masked loads), token counts need not be block multiples (masked keys get
score −inf). Accumulation is float32; O is stored in the dtype of Q, lse in float32.
Runs under ``TRITON_INTERPRET=1`` on CPU tensors (how CI tests it).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attention_lse_fwd_kernel(
    Q,  # [B·H, N, D] queries (fp32 / fp16 / bf16)
    K,  # [B·H, L, D] keys, dtype of Q
    V,  # [B·H, L, DV] values, dtype of Q
    OUT,  # [B·H, N, DV] out, dtype of Q: attention output
    LSE,  # [B·H, N] float32 out: natural-log log-sum-exp of scale · Q Kᵀ per row
    scale,  # float: softmax scale
    N,  # int: query tokens
    L,  # int: key tokens
    D,  # int: head dim of Q and K
    DV,  # int: head dim of V
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(D, 16)
    BLOCK_DV: tl.constexpr,  # next power of two ≥ max(DV, 16)
    DOT_PRECISION: tl.constexpr,  # input_precision of dots with fp32 operands, e.g. "tf32x3"
):
    """O and lse for one block of query rows."""
    block_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    row_valid = rows < N
    q = tl.load(
        Q + bh * N * D + rows[:, None] * D + dims[None, :], mask=row_valid[:, None] & (dims < D)[None, :], other=0.0
    )  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        col_valid = cols < L
        k = tl.load(
            K + bh * L * D + cols[:, None] * D + dims[None, :], mask=col_valid[:, None] & (dims < D)[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(col_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + bh * L * DV + cols[:, None] * DV + vdims[None, :],
            mask=col_valid[:, None] & (vdims < DV)[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        OUT + bh * N * DV + rows[:, None] * DV + vdims[None, :], out.to(OUT.dtype.element_ty),
        mask=row_valid[:, None] & (vdims < DV)[None, :],
    )
    tl.store(LSE + bh * N + rows, m_i + tl.log(l_i), mask=row_valid)
