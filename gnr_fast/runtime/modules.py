"""The two calling conventions as ``nn.Module`` wrappers around one diffusers UNet (STYLE.md §10).

* :class:`PlainUNet` — ``(latents, timestep, context) -> eps``;
* :class:`CapturingUNet` — ``(latents, timestep, context, spec) -> (eps, outputs)``, the guider
  inputs named by the frozen ``spec`` returned as :class:`~gnr_fast.attention.capture.CaptureOutputs`.

Both cast the inputs to the UNet's dtype and its output to float32 (the precision policy: latents,
the DDIM update and the energies live in float32; only the UNet runs in the model dtype). Both are
pure functions of their inputs and the weights, which is what ``torch.compile`` and exporters need.
"""

from __future__ import annotations

import torch

from ..attention.capture import CaptureOutputs, CaptureSpec, Recorder
from ..families import ModelFamily, family_for


class PlainUNet(torch.nn.Module):
    """ε (or v) of a batch: latents [B, 4, h, w], timestep 0-dim long tensor, context [B, 77, C],
    then the family's extra conditioning (e.g. ``timestep_cond`` [B, W]), float32, one row per row."""

    def __init__(self, unet: torch.nn.Module, family: ModelFamily | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.family = family if family is not None else family_for(unet.config)
        # diffusers' ``unet.dtype`` walks every module on each access; the weights' dtype is fixed.
        self.dtype = next(unet.parameters()).dtype

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extras: torch.Tensor
    ) -> torch.Tensor:
        out = self.family.call_unet(self.unet, latents.to(self.dtype), timestep, context.to(self.dtype),
                                    tuple(e.to(self.dtype) for e in extras))
        return out.float()  # [B, 4, h, w]


class CapturingUNet(torch.nn.Module):
    """ε of a batch and the guider inputs ``spec`` names, both returned (nothing recorded on the side);
    the family's extra conditioning follows ``spec`` as in :class:`PlainUNet`."""

    def __init__(self, unet: torch.nn.Module, family: ModelFamily | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.family = family if family is not None else family_for(unet.config)
        self.dtype = next(unet.parameters()).dtype

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, spec: CaptureSpec,
        *extras: torch.Tensor,
    ) -> tuple[torch.Tensor, CaptureOutputs]:
        recorder = Recorder(spec)  # this call's own sink, read back below
        out = self.family.call_unet(self.unet, latents.to(self.dtype), timestep, context.to(self.dtype),
                                    tuple(e.to(self.dtype) for e in extras),
                                    cross_attention_kwargs={"recorder": recorder})
        return out.float(), recorder.outputs()  # [B, 4, h, w], tensors of spec.rows
