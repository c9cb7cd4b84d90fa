"""The two calling conventions and building their runners from the registry.

:func:`make_plain_runner` / :func:`make_capturing_runner` look a backend up in
:mod:`gnr_fast.runtime.registry`, check its availability rule on the UNet's device (raising
:class:`~gnr_fast.errors.BackendUnavailableError` with the reason) and call its factory; plain
runners of backends that run the PyTorch UNet are wrapped for a low ``plain_dtype``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from ..attention.capture import CaptureOutputs, CaptureSpec
from ..errors import BackendUnavailableError
from ..precision import default_plain_dtype, with_plain_dtype
from .calls import CallKind
from .config import RuntimeConfig
from .registry import BackendSpec, backend_spec


class PlainRunner(Protocol):
    """``(latents [B, 4, h, w], timestep 0-dim tensor, context [B, 77, C], *extras) -> eps [B, 4, h, w]``
    float32; ``extras`` are the model family's extra conditioning (e.g. ``timestep_cond`` [B, W])."""

    name: str

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extras: torch.Tensor
    ) -> torch.Tensor: ...


class CapturingRunner(Protocol):
    """``(latents, timestep, context, spec, *extras) -> (eps float32, outputs)``; a grad call is the
    same call under grad mode with latents that require grad."""

    name: str

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, spec: CaptureSpec,
        *extras: torch.Tensor,
    ) -> tuple[torch.Tensor, CaptureOutputs]: ...


def resolve_plain_dtype(config: RuntimeConfig, unet: torch.nn.Module) -> RuntimeConfig:
    """``config`` with ``plain_dtype="auto"`` replaced by
    :func:`~gnr_fast.precision.default_plain_dtype` of ``unet``; other configs as they are.
    Exported backends (a spec with an ``export``) run their export's dtype: "auto" is the model
    dtype there."""
    if config.plain_dtype != "auto":
        return config
    exported = backend_spec(config.plain).export is not None
    return dataclasses.replace(config, plain_dtype=None if exported else default_plain_dtype(unet))


def _available_spec(name: str, kind: CallKind, unet: torch.nn.Module, config: RuntimeConfig) -> BackendSpec:
    spec = backend_spec(name, kind)
    reason = spec.why_unavailable(next(unet.parameters()).device, config)
    if reason is not None:
        raise BackendUnavailableError(f"the {name!r} runtime is unavailable: {reason}; use runtime='eager'")
    return spec


def make_plain_runner(name: str, unet: torch.nn.Module, config: RuntimeConfig) -> PlainRunner:
    """The plain runner of backend ``name`` over ``unet`` (raises :class:`BackendUnavailableError`
    for an unknown name or a backend that cannot run here, naming why)."""
    spec = _available_spec(name, CallKind.PLAIN, unet, config)
    config = resolve_plain_dtype(config, unet)
    runner = spec.factory(CallKind.PLAIN)(unet, config)
    if spec.export is not None:
        return runner
    weights = next(unet.parameters())
    return with_plain_dtype(runner, config.plain_dtype, weights.dtype, weights.device)


def make_capturing_runner(name: str, unet: torch.nn.Module, config: RuntimeConfig) -> CapturingRunner:
    """The capturing runner of backend ``name`` over ``unet`` (see :func:`make_plain_runner`)."""
    spec = _available_spec(name, CallKind.CAPTURING, unet, config)
    return spec.factory(CallKind.CAPTURING)(unet, config)
