"""Triton kernel: both noise-rescale norms and the clipped γ in one launch, per image (DESIGN.md §5).

For image b with Δcfg and the guider gradient g flattened to M values each:

    c_b = ‖Δcfg_b‖₂,  o_b = ‖g_b‖₂  (plain, unsquared norms, as the reference implementation)
    ratio_b = o_b / c_b  (1 when c_b = 0)
    γ_b = clip(ratio_b, lo, hi) / ratio_b  (1 when o_b = 0)

One program per image sweeps its M values in blocks of BLOCK, accumulating both sums of squares
in float32 (a float16 norm overflows past 65504), and stores (c_b, o_b) and γ_b: γ never leaves
the device, so the step needs no host sync. Latents are small (4·64·64 values per image at 512²),
so one program per image is enough and the sums have a fixed order (deterministic).
Runs under ``TRITON_INTERPRET=1`` on CPU tensors (how CI tests it).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rescale_gamma_kernel(
    CFG,  # [B, M] Δcfg (fp32 / fp16 / bf16), contiguous
    GRAD,  # [B, M] guider gradient ∂E/∂z, any of those dtypes
    GAMMA,  # [B] float32 out: γ_b
    NORMS,  # [B, 2] float32 out: (‖Δcfg_b‖, ‖grad_b‖)
    M,  # int: values per image
    lo,  # float: lower bound of the norm ratio
    hi,  # float: upper bound of the norm ratio
    BLOCK: tl.constexpr,  # values per step of the sweep
):
    """Norms and γ of one image."""
    image = tl.program_id(0).to(tl.int64)
    base = image * M
    cfg_sq = tl.zeros([BLOCK], dtype=tl.float32)
    grad_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, M, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        valid = offsets < M
        cfg = tl.load(CFG + base + offsets, mask=valid, other=0.0).to(tl.float32)
        grad = tl.load(GRAD + base + offsets, mask=valid, other=0.0).to(tl.float32)
        cfg_sq += cfg * cfg
        grad_sq += grad * grad
    cfg_norm = tl.sqrt(tl.sum(cfg_sq, axis=0))
    other_norm = tl.sqrt(tl.sum(grad_sq, axis=0))
    ratio = tl.where(cfg_norm != 0, other_norm / tl.where(cfg_norm != 0, cfg_norm, 1.0), 1.0)
    safe_ratio = tl.where(other_norm != 0, ratio, 1.0)
    clipped = tl.minimum(tl.maximum(safe_ratio, lo), hi)
    gamma = tl.where(other_norm != 0, clipped / safe_ratio, 1.0)
    tl.store(GAMMA + image, gamma)
    tl.store(NORMS + image * 2, cfg_norm)
    tl.store(NORMS + image * 2 + 1, other_norm)
