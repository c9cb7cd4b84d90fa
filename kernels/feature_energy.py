"""Triton kernel: a feature energy and its gradient in one pass, per image (DESIGN.md §4).

For one image b of a batch, with current-pass features Φ and source-pass features Φ* flattened to
M values each, d = Φ − Φ*:

    appearance L1 (SQUARED=False):  E_b = mean_m |d_m|,   ∂E_b/∂Φ_m = sign(d_m) / M
    features L2   (SQUARED=True):   E_b = mean_m d_m²,    ∂E_b/∂Φ_m = 2 d_m / M

Every program owns BLOCK values of one image: it reads Φ and Φ* once, writes its partial sum of
|d| (or d²) and the gradient of those values. The wrapper sums the [B, blocks] partials in a
fixed order (deterministic, no atomics) and divides by M. Arithmetic is float32 whatever the
input dtype (a float16 sum of |d| overflows past 65504); the gradient is stored in Φ's dtype.
Runs under ``TRITON_INTERPRET=1`` on CPU tensors (how CI tests it).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _feature_energy_kernel(
    CUR,  # [B, M] current-pass features (fp32 / fp16 / bf16), contiguous
    INV,  # [B, M] source-pass features, dtype of CUR
    PARTIAL,  # [B, BLOCKS] float32 out: Σ |d| (or Σ d²) over each block of BLOCK values
    GRAD,  # [B, M] out, dtype of CUR: ∂E_b/∂CUR (E_b = the mean over the image's M values)
    M,  # int: values per image
    inv_m,  # float: 1 / M
    BLOCKS,  # int: blocks per image, cdiv(M, BLOCK)
    BLOCK: tl.constexpr,  # values per program
    SQUARED: tl.constexpr,  # False: |d| (appearance L1); True: d² (features L2)
):
    """Partial energy and gradient of one block of one image."""
    block = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)
    offsets = block * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    valid = offsets < M
    base = image * M
    cur = tl.load(CUR + base + offsets, mask=valid, other=0.0).to(tl.float32)
    inv = tl.load(INV + base + offsets, mask=valid, other=0.0).to(tl.float32)
    diff = cur - inv  # 0 past M
    if SQUARED:
        value = diff * diff
        grad = 2.0 * diff * inv_m
    else:
        value = tl.abs(diff)
        grad = tl.where(diff > 0, inv_m, tl.where(diff < 0, -inv_m, 0.0))
    tl.store(PARTIAL + image * BLOCKS + block, tl.sum(value, axis=0))
    tl.store(GRAD + base + offsets, grad.to(GRAD.dtype.element_ty), mask=valid)
