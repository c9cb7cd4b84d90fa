"""Samplers: the timesteps, how the source trajectory is made (inversion) and how a latent moves
one step given the final noise — one module per sampler, as k-diffusion keeps one function per
sampler (STYLE.md §14). :data:`SAMPLERS` maps the names a model folder's ``gnr_fast.json`` uses."""

from __future__ import annotations

from .consistency import ConsistencySampler, compose_consistency_noise, invert_consistency, sample_consistency
from .ddim import DDIMSampler, compose_ddim_noise

__all__ = ["SAMPLERS", "ConsistencySampler", "DDIMSampler", "compose_consistency_noise", "compose_ddim_noise",
           "invert_consistency", "sample_consistency"]

SAMPLERS: dict[str, type] = {"ddim": DDIMSampler, "consistency": ConsistencySampler}
"""Sampler name (``gnr_fast.json``'s ``sampler``) → its class."""
