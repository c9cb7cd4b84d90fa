"""The one place UNet calls go through: dispatch to the configured backends, and counting.

:class:`UNetExecutor` holds a plain runner and a capturing runner (built from the registry for a
:class:`~gnr_fast.runtime.config.RuntimeConfig`) and counts every call and batch row, by kind, so
no backend counts anything itself. A call's ``scales`` (per-row guidance scales w, for UNets with
a guidance-scale embedding: consistency models) become the model family's extra inputs here. The paper-literal reference mode reaches it through its
recording adapter (:class:`gnr_fast.reference.recording.RecordingUNet`), which runs
:meth:`UNetExecutor.reference_capture` on an eager runner.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from ..attention.capture import (
    CaptureOutputs,
    CaptureSpec,
    PassCapture,
    SelfAttnLayer,
    check_sites,
    row_captures,
)
from ..config import FeatureSite
from ..families import family_for
from .backends import (
    CapturingRunner,
    PlainRunner,
    make_capturing_runner,
    make_plain_runner,
    resolve_plain_dtype,
)
from .calls import CallKind
from .config import RuntimeConfig

__all__ = ["CallKind", "UNetExecutor"]


class UNetExecutor:
    """Runs plain and capturing calls on the configured backends and counts them.

    ``calls``/``rows`` count every call and batch row; ``calls_by_kind``/``rows_by_kind`` split them
    by :class:`CallKind`. Contexts with one row are broadcast to the batch.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        layers: Sequence[SelfAttnLayer],
        feature_sites: frozenset[FeatureSite],
        runtime: RuntimeConfig,
    ) -> None:
        self.runtime = resolve_plain_dtype(runtime, unet)  # "auto" decided once, for this UNet
        runtime = self.runtime
        self.family = family_for(unet.config)  # a backend that cannot feed its extra inputs refuses in its factory
        self.layers = tuple(layers)
        self.feature_sites = feature_sites
        self.plain_runner: PlainRunner = make_plain_runner(runtime.plain, unet, runtime)
        self.capturing_runner: CapturingRunner = make_capturing_runner(runtime.capturing, unet, runtime)
        # The paper-literal reference mode always runs eagerly (it is the baseline).
        self.reference_runner: CapturingRunner = (
            self.capturing_runner if runtime.capturing == "eager" else make_capturing_runner("eager", unet, runtime)
        )
        self.device = next(unet.parameters()).device
        self.calls = 0
        self.rows = 0
        self.calls_by_kind: Counter[CallKind] = Counter()
        self.rows_by_kind: Counter[CallKind] = Counter()

    @property
    def split_source(self) -> bool:
        """Whether plans give the source row a call of its own (the backends differ)."""
        return self.runtime.split_source

    def _count(self, kind: CallKind, rows: int) -> None:
        self.calls += 1
        self.rows += rows
        self.calls_by_kind[kind] += 1
        self.rows_by_kind[kind] += rows

    @staticmethod
    def _broadcast(latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return context.expand(latents.shape[0], -1, -1) if context.shape[0] != latents.shape[0] else context

    def extras(self, scales: Sequence[float] | None) -> tuple[torch.Tensor, ...]:
        """The family's extra inputs of a call whose rows have guidance scales ``scales`` (None: the
        UNet takes no guidance-scale embedding, no extra inputs)."""
        if scales is None:
            return ()
        return self.family.guidance_extras(scales, self.device)

    def plain(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, scales: Sequence[float] | None = None
    ) -> torch.Tensor:
        """ε of ``latents`` [B, 4, h, w] (float32) at the 0-dim ``timestep`` under ``context`` [B|1, 77, C],
        row b with guidance scale ``scales[b]`` when the UNet embeds one."""
        self._count(CallKind.PLAIN, latents.shape[0])
        return self.plain_runner(latents, timestep, self._broadcast(latents, context), *self.extras(scales))

    def _capturing_call(
        self, runner: CapturingRunner, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
        spec: CaptureSpec, scales: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, CaptureOutputs]:
        check_sites(spec, self.feature_sites)
        extras = self.extras(scales)
        grad = torch.is_grad_enabled() and latents.requires_grad
        self._count(CallKind.GRAD if grad else CallKind.CAPTURING, latents.shape[0])
        return runner(latents, timestep, self._broadcast(latents, context), spec, *extras)

    def capture(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, spec: CaptureSpec,
        scales: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, list[PassCapture]]:
        """ε of the batch and one :class:`PassCapture` per row of ``spec.rows``; a grad call when
        grad mode is on and ``latents`` requires grad. ``scales`` as in :meth:`plain`."""
        eps, outputs = self._capturing_call(self.capturing_runner, latents, timestep, context, spec, scales)
        return eps, row_captures(spec, outputs, self.layers)

    def reference_capture(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, spec: CaptureSpec
    ) -> tuple[torch.Tensor, CaptureOutputs]:
        """A capturing (or grad) call on the eager reference runner, counted like any other; the
        outputs as the runner returns them (the reference mode's recording adapter reads them)."""
        return self._capturing_call(self.reference_runner, latents, timestep, context, spec)
