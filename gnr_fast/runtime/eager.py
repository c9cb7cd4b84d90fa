"""Eager PyTorch UNet calls with optional capture of guider inputs."""

from __future__ import annotations

import torch

from ..attention.capture import PassCapture, capture_features


class EagerUNetRunner:
    """Calls a diffusers ``UNet2DConditionModel`` whose processors were installed by
    :func:`~gnr_fast.attention.install_capture_processors`; counts calls for the benchmarks."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        # diffusers' ``unet.dtype`` walks every module on each access; the weights' dtype is fixed.
        self.dtype = next(unet.parameters()).dtype
        self.calls = 0
        self.rows = 0

    def __call__(
        self, latents: torch.Tensor, timestep: int, context: torch.Tensor, captures: tuple[PassCapture, ...] = ()
    ) -> torch.Tensor:
        self.calls += 1
        self.rows += latents.shape[0]
        t = torch.tensor(timestep, dtype=torch.long, device=latents.device)
        if context.shape[0] != latents.shape[0]:
            context = context.expand(latents.shape[0], -1, -1)
        with capture_features(self.unet, captures):
            return self.unet(
                latents.to(self.dtype),
                t,
                encoder_hidden_states=context,
                cross_attention_kwargs={"captures": captures},
                return_dict=False,
            )[0]
