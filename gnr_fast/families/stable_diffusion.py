"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, no extra conditioning (DESIGN.md §1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ModelFamily


class StableDiffusion(ModelFamily):
    """SD 1.x / 2.x UNets (``UNet2DConditionModel`` without added or guidance conditioning)."""

    name = "sd"

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") is None and unet_config.get("time_cond_proj_dim") is None
