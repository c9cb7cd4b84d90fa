"""Feature-map L2 energy of the stylisation preset: mean((Φ_trg − Φ_inv)²) (DESIGN.md §4)."""

from __future__ import annotations

import torch

from ..attention.capture import PassCapture
from ..config import FeatureSite
from ..ops.feature_energy import mean_feature_energy


def features_map_l2(cur: PassCapture, inv: PassCapture, site: FeatureSite) -> torch.Tensor:
    """Mean squared difference of the features recorded at ``site`` in the two passes.

    Computed in float32 whatever the capture dtype (docs/precision.md): in float16 a square would
    overflow once |Φ_trg − Φ_inv| > 256. On CUDA with Triton one fused kernel computes the energy and its gradient
    (:func:`~gnr_fast.ops.feature_energy.mean_feature_energy`); elsewhere the plain torch expression.
    Returns a 0-dim float32 tensor (float64 for float64 inputs).
    """
    return mean_feature_energy(cur.features[site], inv.features[site], "l2")
