"""Latent-difference guidance: the gradient of ‖z − z*‖², i.e. 2 (z − z*), with no backward (DESIGN.md §4)."""

from __future__ import annotations

import torch


def latents_diff(z: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
    """2 (z − z*): [B, 4, h, w]."""
    return 2 * (z - z_star)
