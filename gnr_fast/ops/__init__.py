"""Custom ops: one module per kernel, each with a pure-torch ``<name>_ref`` beside it (STYLE.md §3)."""

from gnr_fast.ops.attn_map_energy import (
    attention_lse,
    attn_map_energy,
    attn_map_energy_ref,
    triton_supported,
)

__all__ = [
    "attention_lse",
    "attn_map_energy",
    "attn_map_energy_ref",
    "triton_supported",
]
