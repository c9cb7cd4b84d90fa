"""Guider energies, one module per energy, and the weighted energy of one guider at one step."""

from __future__ import annotations

import torch

from ..attention.capture import PassCapture
from ..config import (
    FeaturesMapL2,
    GuiderConfig,
    Role,
    SelfAttnMapL2,
    SelfAttnMapL2Appearance,
    scale_at,
)
from .appearance import appearance_l1
from .features_map import features_map_l2
from .latents_diff import latents_diff
from .self_attn_map import self_attn_map_l2

__all__ = ["appearance_l1", "features_map_l2", "guider_energy", "latents_diff", "self_attn_map_l2"]


def guider_energy(
    guider: GuiderConfig, step: int, captures: dict[Role, PassCapture], layers: frozenset[int]
) -> torch.Tensor:
    """v_g(i) · energy_g for an energy guider at ``step`` from the captures of the passes it reads.

    A 0-dim float32 tensor (float64 for float64 captures) whatever the capture dtype: the scales
    (e.g. 300000) multiply float32 energies, so neither the energy nor its backward's upstream
    gradient overflows float16 (docs/precision.md).
    """
    scale = scale_at(guider.scale, step)
    inv = captures[Role.INV_INV]
    if isinstance(guider, SelfAttnMapL2Appearance):
        cur = captures[Role.CUR_INV]
        attn_term = scale_at(guider.self_attn_scale, step) * self_attn_map_l2(cur, inv, layers)
        app_term = scale_at(guider.app_scale, step) * appearance_l1(cur, inv, guider.feature_site)
        return scale * (attn_term + app_term)
    if isinstance(guider, SelfAttnMapL2):
        return scale * self_attn_map_l2(captures[Role.CUR_INV], inv, layers)
    if isinstance(guider, FeaturesMapL2):
        return scale * features_map_l2(captures[Role.CUR_TRG], inv, guider.feature_site)
    raise TypeError(f"{guider.name} is not an energy guider")
