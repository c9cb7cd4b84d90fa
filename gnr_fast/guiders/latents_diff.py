"""Latent-difference guidance: the gradient of ‖z − z*‖², i.e. 2 (z − z*), with no backward (DESIGN.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .registry import GuiderConfig, GuiderKind, register_guider
from .scales import scale_at


def latents_diff(z: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
    """2 (z − z*): [B, 4, h, w]."""
    return 2 * (z - z_star)


@register_guider
@dataclass(frozen=True)
class LatentsDiff(GuiderConfig):
    """Noise term 2 (z − z*) added directly (no backward). Not scaled by the range rescaler."""

    name: ClassVar[str] = "latents_diff"
    kind: ClassVar[GuiderKind] = GuiderKind.DIRECT

    def noise(self, step: int, z: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
        return scale_at(self.scale, step) * latents_diff(z.detach(), z_star)

    def check_rescale(self, rescale_kind: str) -> None:
        if rescale_kind == "range_other_on_cfg_norm":
            raise ConfigError(
                "latents_diff cannot be combined with range_other_on_cfg_norm (the reference implementation fails "
                "on it too); use noise_rescaling_setup.type: identity_rescaler"
            )
