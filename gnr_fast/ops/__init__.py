"""Custom ops: one module per kernel, each with a pure-torch ``<name>_ref`` beside it (STYLE.md §3)."""

from gnr_fast.ops.attention_lse import attention_with_lse, attention_with_lse_ref
from gnr_fast.ops.attn_map_energy import (
    attention_lse,
    attn_map_energy,
    attn_map_energy_ref,
    native_supported,
    triton_supported,
)

__all__ = [
    "attention_lse",
    "attention_with_lse",
    "attention_with_lse_ref",
    "attn_map_energy",
    "attn_map_energy_ref",
    "native_supported",
    "triton_supported",
]
