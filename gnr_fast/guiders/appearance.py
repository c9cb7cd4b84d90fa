"""Appearance energy: mean(|Φ_cur − Φ_inv|) of a UNet block's output (DESIGN.md §4)."""

from __future__ import annotations

import torch

from ..attention.capture import PassCapture
from ..config import FeatureSite
from ..ops.feature_energy import mean_feature_energy


def appearance_l1(cur: PassCapture, inv: PassCapture, site: FeatureSite) -> torch.Tensor:
    """Mean absolute difference of the features recorded at ``site`` in the two passes.

    Computed in float32 whatever the capture dtype (docs/precision.md): a float16 sum of |Δ| over a
    feature map overflows past 65504. On CUDA with Triton one fused kernel computes the energy and its gradient
    (:func:`~gnr_fast.ops.feature_energy.mean_feature_energy`); elsewhere the plain torch expression.
    Returns a 0-dim float32 tensor (float64 for float64 inputs).
    """
    return mean_feature_energy(cur.features[site], inv.features[site], "l1")
