"""The precision policy (docs/precision.md): which dtype every quantity of an edit lives in.

UNet and text-encoder calls run in the configured *model dtype* (float32, float16 or bfloat16).
Everything the guidance math touches — latents, the DDIM update, energies, gradients to z, norms
and γ — lives in :data:`COMPUTE_DTYPE` (float32; float64 stays float64 so that float64 tests keep
their precision). The VAE runs in float32 when its config says ``force_upcast`` (or the policy says
``vae_upcast="always"``), else in the model dtype with a finite check that retries in float32.
An fp16 grad call multiplies the energy by a power-of-two *loss scale* before ``autograd.grad``
and divides the gradient by it in float32 (:func:`energy_grad_to_latent`), so that the upstream
gradients inside the fp16 UNet backward do not underflow.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from .errors import ConfigError

logger = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.float32
"""Dtype of latents, the DDIM update, energies, gradients to z, norms and γ (docs/precision.md §1)."""

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""Dtypes a model may be loaded in (float64 for tests only)."""

ModelDtype = torch.dtype | Literal["auto"]
"""A model dtype, or ``"auto"``: chosen per device and model size at load
(:func:`gnr_fast.runtime.precision.default_model_dtype`)."""

LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)

FP16_LOSS_SCALE = 2.0**10
"""Default loss scale of fp16 grad calls (docs/precision.md §3: measured on the bundled model at
SD 1.5's top-level token count; large enough to lift the attention-map gradients of the presets out
of fp16's subnormal range, small enough that the UNet backward does not overflow)."""

MIN_LOSS_SCALE = 1.0
LOSS_SCALE_BACKOFF = 2.0**4
"""Factor a loss scale is divided by when the scaled gradient overflows (then the backward is retried)."""

VaeUpcast = Literal["auto", "always", "never"]
VAE_UPCAST_CHOICES = ("auto", "always", "never")


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype guidance math on a tensor of ``dtype`` runs in: float64 stays, all else is float32."""
    return torch.float64 if dtype == torch.float64 else COMPUTE_DTYPE


def to_compute(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its compute dtype (:func:`compute_dtype_for`); differentiable, a no-op when already there."""
    return tensor.to(compute_dtype_for(tensor.dtype))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"float16"`` (the name recorded in inversion files)."""
    return str(dtype).removeprefix("torch.")


def _is_power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(value)
    return value > 0 and mantissa == 0.5


@dataclass(frozen=True)
class PrecisionPolicy:
    """Where each dtype lives; meant to be embedded in the runtime config (docs/precision.md).

    ``model_dtype``: UNet and text encoder weights and calls. ``vae_upcast``: ``"auto"`` runs the
    VAE in float32 when its config has ``force_upcast`` (diffusers' flag), ``"always"`` always,
    ``"never"`` in the model dtype (a non-finite output is still retried in float32).
    ``loss_scale``: power of two the energy is multiplied by before the grad call's backward;
    ``None`` picks :data:`FP16_LOSS_SCALE` for float16 and 1 otherwise (bfloat16 has float32's
    range, so nothing underflows). ``allow_dtype_mismatch``: whether an inversion computed in
    another model dtype may be edited (the trajectory is stored in float32; a warning says so).
    """

    model_dtype: torch.dtype = torch.float32
    vae_upcast: VaeUpcast = "auto"
    loss_scale: float | None = None
    allow_dtype_mismatch: bool = True

    def __post_init__(self) -> None:
        if self.model_dtype not in MODEL_DTYPES:
            raise ConfigError(
                f"dtype={self.model_dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16"
            )
        if self.vae_upcast not in VAE_UPCAST_CHOICES:
            raise ConfigError(f"vae_upcast={self.vae_upcast!r} is unknown; use one of {VAE_UPCAST_CHOICES}")
        if self.loss_scale is not None:
            if isinstance(self.loss_scale, bool) or not isinstance(self.loss_scale, (int, float)):
                raise ConfigError(f"loss_scale must be a power of two or None, got {self.loss_scale!r}")
            if not (math.isfinite(self.loss_scale) and _is_power_of_two(float(self.loss_scale))):
                raise ConfigError(
                    f"loss_scale={self.loss_scale!r} is not a positive power of two (e.g. 1024); a power of two "
                    "scales and unscales the gradient exactly"
                )
            object.__setattr__(self, "loss_scale", float(self.loss_scale))

    @property
    def grad_loss_scale(self) -> float:
        """The loss scale of this policy's grad calls (see the class docstring)."""
        if self.loss_scale is not None:
            return self.loss_scale
        return FP16_LOSS_SCALE if self.model_dtype == torch.float16 else 1.0

    def vae_dtype(self, force_upcast: bool) -> torch.dtype:
        """The dtype the VAE is loaded and run in, given its config's ``force_upcast`` flag."""
        if self.model_dtype not in LOW_PRECISION_DTYPES:
            return self.model_dtype
        if self.vae_upcast == "always" or (self.vae_upcast == "auto" and force_upcast):
            return torch.float32
        return self.model_dtype


class LatentGradient(NamedTuple):
    """∂E/∂z in float32 and the loss scale that produced it (pass it to the next step's call)."""

    grad: torch.Tensor  # like z, in compute dtype
    loss_scale: float


def energy_grad_to_latent(energy: torch.Tensor, z: torch.Tensor, loss_scale: float = 1.0) -> LatentGradient:
    """∂E/∂z of a 0-dim ``energy`` (compute dtype), with loss scaling for low-precision grad calls.

    With ``loss_scale`` 1 this is ``autograd.grad(E, z)`` cast to the compute dtype, with no host
    sync. With a larger power of two, the backward runs on ``loss_scale · E`` — the upstream
    gradients inside the fp16 UNet are that much larger, out of the subnormal range — and the
    result is divided by ``loss_scale`` in float32 (exact: a power of two). If the scaled gradient
    is not finite (the backward overflowed), the scale is divided by :data:`LOSS_SCALE_BACKOFF` and
    the backward retried, down to 1; that check is the one host sync of this path. A gradient that
    is still not finite at scale 1 is returned as it is (the edit loop's finite check reports it).
    The returned scale is the one that worked; pass it to the next step so overflow is not retried
    every step.
    """
    scale = float(loss_scale)
    if scale <= MIN_LOSS_SCALE:
        (grad,) = torch.autograd.grad(energy, z)
        return LatentGradient(to_compute(grad), 1.0)
    while True:
        retry = scale > MIN_LOSS_SCALE
        (scaled,) = torch.autograd.grad(energy * scale, z, retain_graph=retry)
        grad = to_compute(scaled) / scale
        if not retry or bool(torch.isfinite(grad).all()):
            return LatentGradient(grad, scale)
        next_scale = max(MIN_LOSS_SCALE, scale / LOSS_SCALE_BACKOFF)
        logger.warning("loss-scaled gradient overflowed at loss scale %g; retrying at %g", scale, next_scale)
        scale = next_scale
