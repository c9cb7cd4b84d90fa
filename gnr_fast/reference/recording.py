"""The reference mode's calling convention: UNet calls that fill capture objects handed in.

The paper-literal step (:mod:`gnr_fast.reference.step`) and quick scripts call
``RecordingUNet(executor)(latents, timestep, context, captures)``: ``timestep`` may be an int, and
each capture of ``captures`` (one per call, covering every row) is filled with what it asks for,
as the authors' patched UNet records into its controller. The calls run on the executor's eager
reference runner and are counted by the executor; the fast path never uses this adapter.
"""

from __future__ import annotations

import torch

from ..attention.capture import CaptureSpec, PassCapture
from ..runtime.executor import UNetExecutor


class RecordingUNet:
    """``(latents, timestep, context, captures=()) -> eps`` over an :class:`UNetExecutor`."""

    def __init__(self, executor: UNetExecutor) -> None:
        self.executor = executor

    def __call__(
        self,
        latents: torch.Tensor,
        timestep: int | torch.Tensor,
        context: torch.Tensor,
        captures: tuple[PassCapture, ...] = (),
    ) -> torch.Tensor:
        """ε of ``latents`` [B, 4, h, w] (float32); without ``captures`` a plain call."""
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(int(timestep), dtype=torch.long, device=latents.device)
        if not captures:
            return self.executor.plain(latents, timestep, context)
        (capture,) = captures
        spec = CaptureSpec(capture.layers, capture.feature_sites, tuple(range(latents.shape[0])), capture.with_lse,
                           capture.mode)
        eps, outputs = self.executor.reference_capture(latents, timestep, context, spec)
        order, sites = spec.layer_order, spec.site_order
        capture.maps.update(zip(order, outputs.maps))
        capture.queries.update(zip(order, outputs.queries))
        capture.keys.update(zip(order, outputs.keys))
        capture.lse.update(zip(order, outputs.lse))
        capture.scales.update({layer.index: layer.scale for layer in self.executor.layers if layer.index in spec.layers})
        capture.features.update(zip(sites, outputs.features))
        return eps
