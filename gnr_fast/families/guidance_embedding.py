"""SD 1.x/2.x UNets with a guidance-scale embedding (guidance-distilled and consistency models).

The UNet takes ``timestep_cond`` [B, W] (W = ``time_cond_proj_dim``): an embedding of the
classifier-free guidance scale w that ``time_embedding.cond_proj`` adds to the timestep features.
Classifier-free guidance then lives in w alone (no unconditional pass; README_consistency.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import ExtraInput
from .stable_diffusion import StableDiffusion


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(1000 w f_j), cos(1000 w f_j)] with f_j = exp(−j ln(10⁴) / (dim/2 − 1)), j < dim/2, in float32.

    ``w``: [B] guidance scales. The float32 order of the operations is that of the distillation
    code the models were trained with (arguments reach 2·10⁴ rad, so it shows at ~1e-3): the
    frequency step is a float32 ln(10⁴) divided by dim/2 − 1, multiplied into a float32 range, then
    exponentiated. Sin first; w = 0 gives dim/2 zeros then dim/2 ones.
    """
    half = dim // 2
    scaled = w.to(torch.float32) * 1000.0  # [B]
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)  # [dim/2]
    args = scaled[:, None] * freqs[None, :]  # [B, dim/2]
    embedding = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding  # [B, dim]


class GuidanceEmbeddingSD(StableDiffusion):
    """SD UNets with ``time_cond_proj_dim``: one extra input, ``timestep_cond`` [B, W]."""

    name = "sd-guidance-embedding"

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") is None and unet_config.get("time_cond_proj_dim") is not None

    @property
    def embedding_dim(self) -> int:
        return int(self.unet_config["time_cond_proj_dim"])

    @property
    def extra_inputs(self) -> tuple[ExtraInput, ...]:
        return (ExtraInput("timestep_cond", self.embedding_dim),)

    def unet_kwargs(self, extras: Sequence[torch.Tensor]) -> dict[str, Any]:
        super().unet_kwargs(extras)
        return {"timestep_cond": extras[0]}

    def guidance_extras(self, w: Sequence[float], device: torch.device | str = "cpu") -> tuple[torch.Tensor]:
        """The extra inputs of a call whose rows use guidance scales ``w``: (timestep_cond [B, W],)."""
        if any(not math.isfinite(float(x)) for x in w):
            raise ValueError(f"guidance scales must be finite, got {list(w)}")
        return (guidance_scale_embedding(torch.tensor([float(x) for x in w], dtype=torch.float64), self.embedding_dim)
                .to(device),)
