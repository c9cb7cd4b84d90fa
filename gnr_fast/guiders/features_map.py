"""Feature-map L2 energy of the stylisation preset: mean((Φ_trg − Φ_inv)²) (DESIGN.md §4)."""

from __future__ import annotations

import torch

from ..attention.capture import PassCapture
from ..config import FeatureSite
from ..precision import to_compute


def features_map_l2(cur: PassCapture, inv: PassCapture, site: FeatureSite) -> torch.Tensor:
    """Mean squared difference of the features recorded at ``site`` in the two passes.

    Computed in float32 whatever the capture dtype (docs/precision.md): in float16 a square would
    overflow once |Φ_trg − Φ_inv| > 256. Returns a 0-dim float32 tensor (float64 for float64 inputs).
    """
    return torch.mean((to_compute(cur.features[site]) - to_compute(inv.features[site])) ** 2)
