"""Guiders, one module per guider (its config, the passes it reads, what they record, its energy),
and the registry the YAML parser, the planner and both steps read (:mod:`.registry`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..attention.capture import PassCapture
from .appearance import SelfAttnMapL2Appearance, appearance_l1
from .cfg import CfgGuider
from .features_map import FeaturesMapL2, features_map_l2
from .latents_diff import LatentsDiff, latents_diff
from .registry import (
    GUIDERS,
    CaptureNeed,
    Guider,
    GuiderConfig,
    GuiderKind,
    Role,
    capture_need,
    cfg_guider,
    check_guiders,
    direct_guiders,
    energy_guiders,
    guider_type,
    register_guider,
    unregister_guider,
)
from .scales import Schedule, first_steps, last_steps, scale_at
from .self_attn_map import SelfAttnMapL2, self_attn_map_l2

__all__ = [
    "GUIDERS",
    "CaptureNeed",
    "CfgGuider",
    "FeaturesMapL2",
    "Guider",
    "GuiderConfig",
    "GuiderKind",
    "LatentsDiff",
    "Role",
    "Schedule",
    "SelfAttnMapL2",
    "SelfAttnMapL2Appearance",
    "appearance_l1",
    "capture_need",
    "cfg_guider",
    "check_guiders",
    "direct_guiders",
    "energy_guiders",
    "features_map_l2",
    "first_steps",
    "guider_energy",
    "guider_type",
    "last_steps",
    "latents_diff",
    "register_guider",
    "scale_at",
    "self_attn_map_l2",
    "unregister_guider",
]


def guider_energy(
    guider: Guider, step: int, captures: Mapping[Role, PassCapture], layers: frozenset[int]
) -> torch.Tensor:
    """v_g(i) · energy_g for an energy guider at ``step`` from the captures of the passes it reads.

    A 0-dim float32 tensor (float64 for float64 captures) whatever the capture dtype: the scales
    (e.g. 300000) multiply float32 energies, so neither the energy nor its backward's upstream
    gradient overflows float16 (docs/precision.md). A guider of another kind raises ``TypeError``.
    """
    return guider.energy(step, captures, layers)
