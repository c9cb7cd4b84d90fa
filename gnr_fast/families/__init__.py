"""Model families (the UNet call signature and what comes with it), one registry: :func:`family_for`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedArchitectureError
from .base import ExportIO, ExtraInput, ModelFamily, ShapeProfile
from .guidance_embedding import GuidanceEmbeddingSD, guidance_scale_embedding
from .stable_diffusion import StableDiffusion

__all__ = ["ExportIO", "ExtraInput", "FAMILIES", "GuidanceEmbeddingSD", "ModelFamily", "ShapeProfile",
           "StableDiffusion", "family_for", "guidance_scale_embedding", "register_family"]

FAMILIES: list[type[ModelFamily]] = [StableDiffusion, GuidanceEmbeddingSD]
"""Every known family, asked in order; the first whose :meth:`ModelFamily.matches` holds wins."""


def register_family(family: type[ModelFamily]) -> type[ModelFamily]:
    """Add ``family`` to the registry (usable as a class decorator); asked before the built-in ones."""
    if family not in FAMILIES:
        FAMILIES.insert(0, family)
    return family


def family_for(unet_config: Mapping[str, Any]) -> ModelFamily:
    """The adapter of the family a UNet config belongs to; :class:`UnsupportedArchitectureError` if none."""
    for family in FAMILIES:
        if family.matches(unet_config):
            return family(unet_config)
    raise UnsupportedArchitectureError(
        f"no model family supports a UNet with addition_embed_type={unet_config.get('addition_embed_type')!r}, "
        f"time_cond_proj_dim={unet_config.get('time_cond_proj_dim')!r}; supported: {[f.name for f in FAMILIES]}"
    )
