"""The ``"eager"`` backend: PyTorch runs both calling conventions eagerly (always available)."""

from __future__ import annotations

import torch

from ..attention.capture import CaptureOutputs, CaptureSpec
from .config import RuntimeConfig
from .modules import CapturingUNet, PlainUNet


def eager_detail() -> str:
    """What ``gnr-fast doctor`` reports: eager calls run wherever torch does."""
    return f"torch {torch.__version__}"


class EagerPlainRunner:
    """Plain calls ``(latents, timestep, context, *extras) -> eps`` run by PyTorch eagerly."""

    name = "eager"

    def __init__(self, unet: torch.nn.Module, config: RuntimeConfig | None = None) -> None:
        self.module = PlainUNet(unet)

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extras: torch.Tensor
    ) -> torch.Tensor:
        return self.module(latents, timestep, context, *extras)


class EagerCapturingRunner:
    """Capturing calls ``(latents, timestep, context, spec, *extras) -> (eps, outputs)`` run eagerly; a grad
    call is the same call under grad mode with latents that require grad."""

    name = "eager"

    def __init__(self, unet: torch.nn.Module, config: RuntimeConfig | None = None) -> None:
        self.module = CapturingUNet(unet)

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, spec: CaptureSpec,
        *extras: torch.Tensor,
    ) -> tuple[torch.Tensor, CaptureOutputs]:
        return self.module(latents, timestep, context, spec, *extras)
