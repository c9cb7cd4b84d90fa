"""Samplers: the timesteps, how the source trajectory is made (inversion), the conditioning of each
UNet row, how the noise terms are composed and how a latent moves one step given the final noise —
one module per sampler, as k-diffusion keeps one function per sampler (STYLE.md §14).
:data:`SAMPLERS` maps the names a model folder's ``gnr_fast.json`` uses; :class:`Sampler` is what the
edit loop, the planner, the fast step and the inversion ask of one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from ..config import EditConfig
from ..noise_terms import Eps, NoiseRows, StepTerms
from .consistency import ConsistencySampler, compose_consistency_noise, match_color_stats
from .ddim import DDIMSampler, combine_terms, compose_ddim_noise

__all__ = ["SAMPLERS", "ConsistencySampler", "DDIMSampler", "Sampler", "combine_terms", "compose_consistency_noise",
           "compose_ddim_noise", "match_color_stats"]

SAMPLERS: dict[str, type] = {"ddim": DDIMSampler, "consistency": ConsistencySampler}
"""Sampler name (``gnr_fast.json``'s ``sampler``) → its class."""


class Sampler(Protocol):
    """The sampler seam (``DDIMSampler``, ``ConsistencySampler``)."""

    name: str
    noise_rows: NoiseRows  # which rows the noise composition needs (read by the planner)

    @property
    def num_steps(self) -> int: ...

    @property
    def timesteps(self) -> Sequence[int]: ...  # editing timesteps, in order

    @property
    def inversion_timesteps(self) -> Sequence[int]: ...  # the inversion's UNet timesteps, in order

    def check_config(self, config: EditConfig) -> None: ...  # ConfigError for a config it cannot run

    def step(self, z: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor: ...

    def inversion_start(self, z0: torch.Tensor) -> torch.Tensor: ...

    def invert_step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor: ...

    def guidance_scales(self, config: EditConfig | None, step: int, target_rows: Sequence[bool]) -> list[float] | None:
        """Per-row guidance-scale embeddings' w (None: the UNet takes none)."""
        ...

    def terms(
        self, config: EditConfig, step: int, eps: Mapping[Eps, torch.Tensor], guider_grad: torch.Tensor | None,
        direct: torch.Tensor | None, energy: torch.Tensor | float,
    ) -> StepTerms: ...

    def finish_image(self, image: np.ndarray, pixel_stats: tuple[float, float] | None) -> np.ndarray: ...
