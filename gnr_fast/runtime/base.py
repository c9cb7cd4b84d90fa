"""The calling convention every UNet backend implements."""

from __future__ import annotations

from typing import Protocol

import torch

from ..attention.capture import PassCapture


class UNetRunner(Protocol):
    """(latents, timestep, context[, captures]) → UNet output (ε or v), one batched call."""

    def __call__(
        self, latents: torch.Tensor, timestep: int, context: torch.Tensor, captures: tuple[PassCapture, ...] = ()
    ) -> torch.Tensor:  # [B, 4, h, w]
        ...
