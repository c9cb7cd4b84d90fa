"""Feature-map L2 energy of the stylisation preset: mean((Φ_trg − Φ_inv)²) (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..attention.capture import PassCapture
from ..attention.sites import FeatureSite
from ..errors import ConfigError
from ..ops.feature_energy import mean_feature_energy
from .registry import GuiderConfig, GuiderKind, Role, register_guider
from .scales import scale_at


def features_map_l2(cur: PassCapture, inv: PassCapture, site: FeatureSite) -> torch.Tensor:
    """Mean squared difference of the features recorded at ``site`` in the two passes.

    Computed in float32 whatever the capture dtype (docs/precision.md): in float16 a square would
    overflow once |Φ_trg − Φ_inv| > 256. On CUDA with Triton one fused kernel computes the energy and its gradient
    (:func:`~gnr_fast.ops.feature_energy.mean_feature_energy`); elsewhere the plain torch expression.
    Returns a 0-dim float32 tensor (float64 for float64 inputs).
    """
    return mean_feature_energy(cur.features[site], inv.features[site], "l2")


@register_guider
@dataclass(frozen=True)
class FeaturesMapL2(GuiderConfig):
    """mean((Φ_trg − Φ_inv)²) of one UNet block's output; pair (cur_trg, inv_inv)."""

    name: ClassVar[str] = "features_map_l2"
    kind: ClassVar[GuiderKind] = GuiderKind.ENERGY
    reads: ClassVar[tuple[Role, ...]] = (Role.CUR_TRG, Role.INV_INV)
    block: Literal["up", "mid", "down"] = "up"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block not in ("up", "mid", "down"):
            raise ConfigError(f"features_map_l2.block must be 'up', 'mid' or 'down', got {self.block!r}")

    @property
    def feature_site(self) -> FeatureSite:
        return {"up": FeatureSite.UP, "mid": FeatureSite.MID, "down": FeatureSite.DOWN}[self.block]

    @property
    def feature_sites(self) -> frozenset[FeatureSite]:
        return frozenset({self.feature_site})

    def energy(self, step: int, captures: Mapping[Role, PassCapture], layers: frozenset[int]) -> torch.Tensor:
        return scale_at(self.scale, step) * features_map_l2(captures[Role.CUR_TRG], captures[Role.INV_INV], self.feature_site)
