"""Self-attention + appearance guider of the non-stylisation preset:
s_self · Σ_layers mean((A_cur − A_inv)²) + s_app · mean(|Φ_cur − Φ_inv|) (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..attention.capture import PassCapture
from ..attention.sites import FeatureSite
from ..errors import ConfigError
from ..ops.feature_energy import mean_feature_energy
from .registry import GuiderConfig, GuiderKind, Role, register_guider
from .scales import Schedule, check_schedule, first_steps, last_steps, scale_at
from .self_attn_map import self_attn_map_l2


def appearance_l1(cur: PassCapture, inv: PassCapture, site: FeatureSite) -> torch.Tensor:
    """Mean absolute difference of the features recorded at ``site`` in the two passes.

    Computed in float32 whatever the capture dtype (docs/precision.md): a float16 sum of |Δ| over a
    feature map overflows past 65504. On CUDA with Triton one fused kernel computes the energy and its gradient
    (:func:`~gnr_fast.ops.feature_energy.mean_feature_energy`); elsewhere the plain torch expression.
    Returns a 0-dim float32 tensor (float64 for float64 inputs).
    """
    return mean_feature_energy(cur.features[site], inv.features[site], "l1")


@register_guider
@dataclass(frozen=True)
class SelfAttnMapL2Appearance(GuiderConfig):
    """s_self · Σ_layers mean((A_cur − A_inv)²) + s_app · mean(|Φ_cur − Φ_inv|); pair (cur_inv, inv_inv)."""

    name: ClassVar[str] = "self_attn_map_l2_appearance"
    kind: ClassVar[GuiderKind] = GuiderKind.ENERGY
    reads: ClassVar[tuple[Role, ...]] = (Role.CUR_INV, Role.INV_INV)
    reads_attention: ClassVar[bool] = True
    scale: Schedule = 1.0
    self_attn_scale: Schedule = 300000.0
    app_scale: Schedule = 500.0
    new_features: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "self_attn_scale", check_schedule(self.self_attn_scale, f"{self.name}.self_attn_gs"))
        object.__setattr__(self, "app_scale", check_schedule(self.app_scale, f"{self.name}.app_gs"))

    def schedules(self) -> dict[str, Schedule]:
        return {"g_scale": self.scale, "self_attn_gs": self.self_attn_scale, "app_gs": self.app_scale}

    def is_active(self, step: int) -> bool:
        if scale_at(self.scale, step) == 0.0:
            return False
        return scale_at(self.self_attn_scale, step) != 0.0 or scale_at(self.app_scale, step) != 0.0

    @property
    def feature_site(self) -> FeatureSite:
        return FeatureSite.UP_LAST if self.new_features else FeatureSite.CONV_NORM_OUT

    @property
    def feature_sites(self) -> frozenset[FeatureSite]:
        return frozenset({self.feature_site})

    def energy(self, step: int, captures: Mapping[Role, PassCapture], layers: frozenset[int]) -> torch.Tensor:
        cur, inv = captures[Role.CUR_INV], captures[Role.INV_INV]
        attn_term = scale_at(self.self_attn_scale, step) * self_attn_map_l2(cur, inv, layers)
        app_term = scale_at(self.app_scale, step) * appearance_l1(cur, inv, self.feature_site)
        return scale_at(self.scale, step) * (attn_term + app_term)

    @classmethod
    def from_kwargs(cls, scale: Schedule, kwargs: dict[str, Any], num_steps: int) -> SelfAttnMapL2Appearance:
        """The authors' kwargs: ``self_attn_gs``, ``app_gs`` (required), ``new_features`` (default
        false) and at most one of ``total_first_steps`` / ``total_last_steps`` (the window the two
        scales apply in)."""
        self_gs = kwargs.pop("self_attn_gs")
        app_gs = kwargs.pop("app_gs")
        first = kwargs.pop("total_first_steps", None)
        last = kwargs.pop("total_last_steps", None)
        if first is not None and last is not None:
            raise ConfigError("give total_first_steps or total_last_steps, not both")
        if last is not None:
            self_gs, app_gs = last_steps(self_gs, last, num_steps), last_steps(app_gs, last, num_steps)
        elif first is not None:
            self_gs, app_gs = first_steps(self_gs, first, num_steps), first_steps(app_gs, first, num_steps)
        return cls(
            scale=scale,
            self_attn_scale=self_gs,
            app_scale=app_gs,
            new_features=bool(kwargs.pop("new_features", False)),
            **kwargs,
        )
