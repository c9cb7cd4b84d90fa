"""What the attention ops derive the same way: the softmax scale and compute dtype, argument
checks, the row chunks of the pure-torch paths, and Triton launch arithmetic."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gnr_fast.errors import InputError

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


# Precision of the dots with float32 operands (all scores for float32 inputs; the dS products for
# every dtype): "tf32x3" runs on tensor cores at about float32 accuracy. Plain "tf32" truncates
# operands to 10 mantissa bits (biased), too coarse for A − A_ref, which partly cancels; "ieee"
# spilled thousands of bytes per thread in the sm_90 compile. The interpreter computes every dot
# in float32 regardless.
DOT_PRECISION = "tf32x3"



def softmax_scale(q: Tensor, scale: float | None) -> float:
    """The softmax scale: ``scale`` itself, or ``D ** -0.5`` for ``q`` of shape [..., D]."""
    return float(scale) if scale is not None else q.shape[-1] ** -0.5


def compute_dtype(q: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (softmax statistics are never kept in halves)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check_scale_and_chunk(scale: float | None, chunk: int | None) -> None:
    """Raise :class:`InputError` unless ``scale`` is None or a finite non-zero number and
    ``chunk`` is None or a positive int."""
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0
    ):
        raise InputError(f"scale must be a finite non-zero float (or None for D**-0.5), got {scale!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"chunk must be a positive int (or None for the default), got {chunk!r}")


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


def next_power_of_2(n: int) -> int:
    """Smallest power of two ≥ n (n ≥ 1): Triton block sizes."""
    return 1 << (n - 1).bit_length()


def cdiv(n: int, d: int) -> int:
    """⌈n / d⌉ for positive ints: Triton grid sizes."""
    return -(-n // d)
