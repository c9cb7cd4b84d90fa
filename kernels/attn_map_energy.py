"""Triton kernels for the self-attention-map L2 energy (DESIGN.md §4, §8).

For one self-attention layer with current-pass Q, K and source-pass Q*, K*, lse* the energy is

    E = mean_{b,h,i,j} (A_ij − A*_ij)²,  A = softmax(scale · Q Kᵀ),  A* = exp(scale · Q* K*ᵀ − lse*).

The kernels never hold more than one [BLOCK_M, BLOCK_N] tile of A or A* (flash-attention style);
every program owns one (batch·head, block of rows) pair and loops over the other axis.

Kernels (all tensors are contiguous; Q-like tensors are viewed as [B·H, N, D], row vectors as
[B·H, N]):

- ``_attn_map_energy_fwd_kernel``: per query row i, the log-sum-exp of the current scores
  (first sweep over key blocks, online max/sum) and then (second sweep)
  ``row_sq_i = Σ_j (A_ij − A*_ij)²`` and ``row_dot_i = Σ_j A_ij (A_ij − A*_ij)``.
  The host reduces ``E = Σ_i row_sq_i / (B·H·N·N)``; no atomics, so results are deterministic.
- ``_attn_map_energy_bwd_dq_kernel`` / ``_attn_map_energy_bwd_dk_kernel``: with per-row output
  gradients g_i = ∂L/∂row_sq_i, ∂L/∂A_ij = 2 g_i (A_ij − A*_ij) and the softmax backward gives
  ``dS_ij = 2 g_i A_ij ((A_ij − A*_ij) − row_dot_i)``; then dQ = scale · dS K (one program per
  query block, loop over key blocks) and dK = scale · dSᵀ Q (one program per key block, loop over
  query blocks). Both recompute A and A* from the saved per-row statistics.

dS is kept in float32 even for fp16/bf16 inputs: its entries are O(1/N²) and would underflow fp16.
Every kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors (that is how CI tests it).
"""

from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _scores_tile(q, k, scale, DOT_PRECISION: tl.constexpr):
    """scale · q kᵀ for a [BLOCK_M, BLOCK_D] query tile and a [BLOCK_N, BLOCK_D] key tile."""
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]


@triton.jit
def _probs_tiles(q, k, q_ref, k_ref, lse, lse_ref, col_valid, scale, DOT_PRECISION: tl.constexpr):
    """Tiles of A and A* ([BLOCK_M, BLOCK_N], float32), zero in key columns past N."""
    s = _scores_tile(q, k, scale, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    s_ref = _scores_tile(q_ref, k_ref, scale, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    a = tl.where(col_valid[None, :], tl.exp(s - lse[:, None]), 0.0)
    a_ref = tl.where(col_valid[None, :], tl.exp(s_ref - lse_ref[:, None]), 0.0)
    return a, a_ref


@triton.jit
def _attn_map_energy_fwd_kernel(
    Q,  # [B·H, N, D] current-pass queries (fp32 / fp16 / bf16)
    K,  # [B·H, N, D] current-pass keys, dtype of Q
    Q_REF,  # [B·H, N, D] source-pass queries, dtype of Q
    K_REF,  # [B·H, N, D] source-pass keys, dtype of Q
    LSE_REF,  # [B·H, N] float32, log-sum-exp of scale · Q_REF K_REFᵀ per row
    LSE,  # [B·H, N] float32 out: log-sum-exp of scale · Q Kᵀ per row
    ROW_SQ,  # [B·H, N] float32 out: Σ_j (A_ij − A*_ij)²
    ROW_DOT,  # [B·H, N] float32 out: Σ_j A_ij (A_ij − A*_ij)
    scale,  # float: softmax scale
    N,  # int: tokens (rows = keys)
    D,  # int: head dimension
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(D, 16)
    DOT_PRECISION: tl.constexpr,  # input_precision of dots with fp32 operands, e.g. "tf32x3"
):
    """Per-row log-sum-exp, Σ (A − A*)² and Σ A (A − A*) for one block of query rows."""
    block_m = tl.program_id(0)
    bh = tl.program_id(1)
    qkv_base = bh.to(tl.int64) * N * D
    row_base = bh.to(tl.int64) * N

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_valid = rows < N
    dim_valid = dims < D
    row_offsets = rows[:, None] * D + dims[None, :]  # [BLOCK_M, BLOCK_D]
    row_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(Q + qkv_base + row_offsets, mask=row_mask, other=0.0)
    q_ref = tl.load(Q_REF + qkv_base + row_offsets, mask=row_mask, other=0.0)
    lse_ref = tl.load(LSE_REF + row_base + rows, mask=row_valid, other=0.0)  # [BLOCK_M]

    # Sweep 1: online log-sum-exp of the current scores (running max m_i, running sum l_i).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        col_valid = cols < N
        col_offsets = cols[:, None] * D + dims[None, :]  # [BLOCK_N, BLOCK_D]
        col_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(K + qkv_base + col_offsets, mask=col_mask, other=0.0)
        s = _scores_tile(q, k, scale, DOT_PRECISION)
        s = tl.where(col_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)  # [BLOCK_M]

    # Sweep 2: accumulate the per-row statistics of the difference map A − A*.
    row_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_dot = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        col_offsets = cols[:, None] * D + dims[None, :]
        col_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(K + qkv_base + col_offsets, mask=col_mask, other=0.0)
        k_ref = tl.load(K_REF + qkv_base + col_offsets, mask=col_mask, other=0.0)
        a, a_ref = _probs_tiles(q, k, q_ref, k_ref, lse, lse_ref, col_valid, scale, DOT_PRECISION)
        diff = a - a_ref
        row_sq += tl.sum(diff * diff, axis=1)
        row_dot += tl.sum(a * diff, axis=1)

    tl.store(LSE + row_base + rows, lse, mask=row_valid)
    tl.store(ROW_SQ + row_base + rows, row_sq, mask=row_valid)
    tl.store(ROW_DOT + row_base + rows, row_dot, mask=row_valid)


@triton.jit
def _attn_map_energy_bwd_dq_kernel(
    Q,  # [B·H, N, D] current-pass queries
    K,  # [B·H, N, D] current-pass keys, dtype of Q
    Q_REF,  # [B·H, N, D] source-pass queries, dtype of Q
    K_REF,  # [B·H, N, D] source-pass keys, dtype of Q
    LSE_REF,  # [B·H, N] float32 source log-sum-exp
    LSE,  # [B·H, N] float32 current log-sum-exp (from the forward kernel)
    ROW_DOT,  # [B·H, N] float32 Σ_j A_ij (A_ij − A*_ij) (from the forward kernel)
    GRAD_ROW,  # [B·H, N] float32 ∂L/∂row_sq_i
    DQ,  # [B·H, N, D] out, dtype of Q: ∂L/∂Q
    scale,  # float: softmax scale
    N,  # int: tokens
    D,  # int: head dimension
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(D, 16)
    DOT_PRECISION: tl.constexpr,  # input_precision of dots with fp32 operands
):
    """dQ_i = scale · Σ_j dS_ij K_j for one block of query rows, looping over key blocks."""
    block_m = tl.program_id(0)
    bh = tl.program_id(1)
    qkv_base = bh.to(tl.int64) * N * D
    row_base = bh.to(tl.int64) * N

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < N
    dim_valid = dims < D
    row_offsets = rows[:, None] * D + dims[None, :]  # [BLOCK_M, BLOCK_D]
    row_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(Q + qkv_base + row_offsets, mask=row_mask, other=0.0)
    q_ref = tl.load(Q_REF + qkv_base + row_offsets, mask=row_mask, other=0.0)
    lse = tl.load(LSE + row_base + rows, mask=row_valid, other=0.0)  # [BLOCK_M]
    lse_ref = tl.load(LSE_REF + row_base + rows, mask=row_valid, other=0.0)
    row_dot = tl.load(ROW_DOT + row_base + rows, mask=row_valid, other=0.0)
    grad_row = tl.load(GRAD_ROW + row_base + rows, mask=row_valid, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        col_offsets = cols[:, None] * D + dims[None, :]  # [BLOCK_N, BLOCK_D]
        col_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(K + qkv_base + col_offsets, mask=col_mask, other=0.0)
        k_ref = tl.load(K_REF + qkv_base + col_offsets, mask=col_mask, other=0.0)
        a, a_ref = _probs_tiles(q, k, q_ref, k_ref, lse, lse_ref, col_valid, scale, DOT_PRECISION)
        ds = a * ((a - a_ref) - row_dot[:, None])  # [BLOCK_M, BLOCK_N], dS without 2 g_i
        dq += tl.dot(ds, k.to(tl.float32), input_precision=DOT_PRECISION)

    dq = dq * (2.0 * scale * grad_row)[:, None]
    tl.store(DQ + qkv_base + row_offsets, dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _attn_map_energy_bwd_dk_kernel(
    Q,  # [B·H, N, D] current-pass queries
    K,  # [B·H, N, D] current-pass keys, dtype of Q
    Q_REF,  # [B·H, N, D] source-pass queries, dtype of Q
    K_REF,  # [B·H, N, D] source-pass keys, dtype of Q
    LSE_REF,  # [B·H, N] float32 source log-sum-exp
    LSE,  # [B·H, N] float32 current log-sum-exp (from the forward kernel)
    ROW_DOT,  # [B·H, N] float32 Σ_j A_ij (A_ij − A*_ij) (from the forward kernel)
    GRAD_ROW,  # [B·H, N] float32 ∂L/∂row_sq_i
    DK,  # [B·H, N, D] out, dtype of K: ∂L/∂K
    scale,  # float: softmax scale
    N,  # int: tokens
    D,  # int: head dimension
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(D, 16)
    DOT_PRECISION: tl.constexpr,  # input_precision of dots with fp32 operands
):
    """dK_j = scale · Σ_i dS_ij Q_i for one block of keys, looping over query blocks."""
    block_n = tl.program_id(0)
    bh = tl.program_id(1)
    qkv_base = bh.to(tl.int64) * N * D
    row_base = bh.to(tl.int64) * N

    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_valid = cols < N
    dim_valid = dims < D
    col_offsets = cols[:, None] * D + dims[None, :]  # [BLOCK_N, BLOCK_D]
    col_mask = col_valid[:, None] & dim_valid[None, :]
    k = tl.load(K + qkv_base + col_offsets, mask=col_mask, other=0.0)
    k_ref = tl.load(K_REF + qkv_base + col_offsets, mask=col_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_valid = rows < N
        row_offsets = rows[:, None] * D + dims[None, :]  # [BLOCK_M, BLOCK_D]
        row_mask = row_valid[:, None] & dim_valid[None, :]
        q = tl.load(Q + qkv_base + row_offsets, mask=row_mask, other=0.0)
        q_ref = tl.load(Q_REF + qkv_base + row_offsets, mask=row_mask, other=0.0)
        lse = tl.load(LSE + row_base + rows, mask=row_valid, other=0.0)
        lse_ref = tl.load(LSE_REF + row_base + rows, mask=row_valid, other=0.0)
        row_dot = tl.load(ROW_DOT + row_base + rows, mask=row_valid, other=0.0)
        # Rows past N get g = 0, which zeroes their (finite) contribution.
        grad_row = tl.load(GRAD_ROW + row_base + rows, mask=row_valid, other=0.0)
        a, a_ref = _probs_tiles(q, k, q_ref, k_ref, lse, lse_ref, col_valid, scale, DOT_PRECISION)
        ds = a * ((a - a_ref) - row_dot[:, None]) * (2.0 * grad_row)[:, None]  # [BLOCK_M, BLOCK_N]
        dk += tl.dot(tl.trans(ds), q.to(tl.float32), input_precision=DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + qkv_base + col_offsets, dk.to(DK.dtype.element_ty), mask=col_mask)
