"""The backend registry: a name → a factory of plain or capturing runners.

Adding a backend is a few lines: a runner class with the calling convention, then
``PLAIN_BACKENDS["onnx"] = OnnxPlainRunner`` (a factory ``(unet, config) -> runner`` that raises
:class:`~gnr_fast.errors.BackendUnavailableError` naming what is missing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..attention.capture import CaptureOutputs, CaptureSpec
from ..errors import BackendUnavailableError
from .compiled import CompiledCapturingRunner, CompiledPlainRunner
from .config import RuntimeConfig
from .eager import EagerCapturingRunner, EagerPlainRunner
from .onnx import onnx_plain_runner
from .precision import resolve_plain_dtype, with_plain_dtype
from .tensorrt import tensorrt_plain_runner


class PlainRunner(Protocol):
    """``(latents [B, 4, h, w], timestep 0-dim tensor, context [B, 77, C]) -> eps [B, 4, h, w]`` float32."""

    name: str

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...


class CapturingRunner(Protocol):
    """``(latents, timestep, context, spec) -> (eps float32, outputs)``; a grad call is the same call
    under grad mode with latents that require grad."""

    name: str

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, spec: CaptureSpec
    ) -> tuple[torch.Tensor, CaptureOutputs]: ...


PlainFactory = Callable[[torch.nn.Module, RuntimeConfig], PlainRunner]
CapturingFactory = Callable[[torch.nn.Module, RuntimeConfig], CapturingRunner]

PLAIN_BACKENDS: dict[str, PlainFactory] = {
    "eager": EagerPlainRunner,
    "compiled": CompiledPlainRunner,
    "onnx": onnx_plain_runner,
    "tensorrt": tensorrt_plain_runner,
}
EXPORTED_BACKENDS = frozenset({"onnx", "tensorrt"})
"""Plain backends that run an exported graph in its own dtype (``plain_dtype`` picks the export's)."""
CAPTURING_BACKENDS: dict[str, CapturingFactory] = {"eager": EagerCapturingRunner, "compiled": CompiledCapturingRunner}


def make_plain_runner(name: str, unet: torch.nn.Module, config: RuntimeConfig) -> PlainRunner:
    """The plain runner of backend ``name`` over ``unet`` (raises :class:`BackendUnavailableError`
    for an unknown name or a backend that cannot run here)."""
    if name not in PLAIN_BACKENDS:
        raise BackendUnavailableError(f"plain backend {name!r} is unknown; available: {sorted(PLAIN_BACKENDS)}")
    config = resolve_plain_dtype(config, unet)
    runner = PLAIN_BACKENDS[name](unet, config)
    if name in EXPORTED_BACKENDS:
        return runner
    weights = next(unet.parameters())
    return with_plain_dtype(runner, config.plain_dtype, weights.dtype, weights.device)


def make_capturing_runner(name: str, unet: torch.nn.Module, config: RuntimeConfig) -> CapturingRunner:
    """The capturing runner of backend ``name`` over ``unet`` (see :func:`make_plain_runner`)."""
    if name not in CAPTURING_BACKENDS:
        raise BackendUnavailableError(f"capturing backend {name!r} is unknown; available: {sorted(CAPTURING_BACKENDS)}")
    return CAPTURING_BACKENDS[name](unet, config)
