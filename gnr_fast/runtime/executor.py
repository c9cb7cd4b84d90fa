"""The one place UNet calls go through: dispatch to the configured backends, and counting.

:class:`UNetExecutor` holds a plain runner and a capturing runner (built by the registry from a
:class:`~gnr_fast.runtime.config.RuntimeConfig`) and counts every call and batch row, by kind, so
no backend counts anything itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from enum import Enum

import torch

from ..attention.capture import (
    CaptureSpec,
    PassCapture,
    SelfAttnLayer,
    check_sites,
    row_captures,
)
from ..config import FeatureSite
from .backends import (
    CapturingRunner,
    PlainRunner,
    make_capturing_runner,
    make_plain_runner,
)
from .config import RuntimeConfig
from .eager import EagerCapturingRunner
from .precision import resolve_plain_dtype


class CallKind(str, Enum):
    """The three kinds of UNet call a plan is made of (DESIGN.md §9)."""

    PLAIN = "plain"  # no grad, no captures: any backend
    CAPTURING = "capturing"  # no grad, returns (ε, captures): the source pass
    GRAD = "grad"  # autograd on, returns (ε, captures) for the energies' backward


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
        self.layers = tuple(layers)
        self.feature_sites = feature_sites
        self.plain_runner: PlainRunner = make_plain_runner(runtime.plain, unet, runtime)
        self.capturing_runner: CapturingRunner = make_capturing_runner(runtime.capturing, unet, runtime)
        # The paper-literal reference mode always runs eagerly (it is the baseline).
        self.reference_runner: CapturingRunner = (
            self.capturing_runner if isinstance(self.capturing_runner, EagerCapturingRunner) else EagerCapturingRunner(unet)
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

    def plain(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """ε of ``latents`` [B, 4, h, w] (float32) at the 0-dim ``timestep`` under ``context`` [B|1, 77, C]."""
        self._count(CallKind.PLAIN, latents.shape[0])
        return self.plain_runner(latents, timestep, self._broadcast(latents, context))

    def capture(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, spec: CaptureSpec
    ) -> tuple[torch.Tensor, list[PassCapture]]:
        """ε of the batch and one :class:`PassCapture` per row of ``spec.rows``; a grad call when
        grad mode is on and ``latents`` requires grad."""
        check_sites(spec, self.feature_sites)
        grad = torch.is_grad_enabled() and latents.requires_grad
        self._count(CallKind.GRAD if grad else CallKind.CAPTURING, latents.shape[0])
        eps, outputs = self.capturing_runner(latents, timestep, self._broadcast(latents, context), spec)
        return eps, row_captures(spec, outputs, self.layers)

    def __call__(
        self,
        latents: torch.Tensor,
        timestep: int | torch.Tensor,
        context: torch.Tensor,
        captures: tuple[PassCapture, ...] = (),
    ) -> torch.Tensor:
        """The recording convention of the paper-literal reference step (and of quick scripts):
        ``timestep`` may be an int, and each capture of ``captures`` (one per call, all rows) is
        filled with what it asks for. Runs on the eager backend; the fast path never uses it."""
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(int(timestep), dtype=torch.long, device=latents.device)
        if not captures:
            return self.plain(latents, timestep, context)
        (capture,) = captures
        spec = CaptureSpec(capture.layers, capture.feature_sites, tuple(range(latents.shape[0])), capture.with_lse,
                           capture.mode)
        check_sites(spec, self.feature_sites)
        grad = torch.is_grad_enabled() and latents.requires_grad
        self._count(CallKind.GRAD if grad else CallKind.CAPTURING, latents.shape[0])
        eps, outputs = self.reference_runner(latents, timestep, self._broadcast(latents, context), spec)
        order, sites = spec.layer_order, spec.site_order
        capture.maps.update(zip(order, outputs.maps))
        capture.queries.update(zip(order, outputs.queries))
        capture.keys.update(zip(order, outputs.keys))
        capture.lse.update(zip(order, outputs.lse))
        capture.scales.update({layer.index: layer.scale for layer in self.layers if layer.index in spec.layers})
        capture.features.update(zip(sites, outputs.features))
        return eps
