"""Appearance energy: mean(|Φ_cur − Φ_inv|) of a UNet block's output (DESIGN.md §4)."""

from __future__ import annotations

import torch

from ..attention.capture import PassCapture
from ..config import FeatureSite


def appearance_l1(cur: PassCapture, inv: PassCapture, site: FeatureSite) -> torch.Tensor:
    """Mean absolute difference of the features recorded at ``site`` in the two passes."""
    return torch.mean(torch.abs(cur.features[site] - inv.features[site]))
