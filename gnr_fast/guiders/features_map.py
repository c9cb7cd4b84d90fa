"""Feature-map L2 energy of the stylisation preset: mean((Φ_trg − Φ_inv)²) (DESIGN.md §4)."""

from __future__ import annotations

import torch

from ..attention.capture import PassCapture
from ..config import FeatureSite


def features_map_l2(cur: PassCapture, inv: PassCapture, site: FeatureSite) -> torch.Tensor:
    """Mean squared difference of the features recorded at ``site`` in the two passes."""
    return torch.mean((cur.features[site] - inv.features[site]) ** 2)
