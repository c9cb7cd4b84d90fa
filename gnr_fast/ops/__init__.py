"""Custom ops: one module per kernel, each with a pure-torch ``<name>_ref`` beside it (STYLE.md §3)."""

from gnr_fast.quiet import third_party_noise_filtered

# Registering a triton_op without triton installed logs torch's "Triton not available" note (gnr_fast.quiet).
with third_party_noise_filtered():
    from gnr_fast.ops.attention_lse import attention_lse, attention_with_lse, attention_with_lse_ref
    from gnr_fast.ops.attn_map_energy import (
        attn_map_energy,
        attn_map_energy_ref,
        native_supported,
        triton_supported,
    )
    from gnr_fast.ops.feature_energy import (
        feature_energy,
        feature_energy_ref,
        mean_feature_energy,
    )
    from gnr_fast.ops.rescale_norms import rescale_gammas, rescale_gammas_ref


__all__ = [
    "attention_lse",
    "attention_with_lse",
    "attention_with_lse_ref",
    "attn_map_energy",
    "attn_map_energy_ref",
    "feature_energy",
    "feature_energy_ref",
    "mean_feature_energy",
    "native_supported",
    "rescale_gammas",
    "rescale_gammas_ref",
    "triton_supported",
]
