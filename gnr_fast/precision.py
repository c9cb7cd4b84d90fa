"""The precision policy (docs/precision.md): which dtype every quantity of an edit lives in.

UNet and text-encoder calls run in the configured *model dtype* (float32, float16 or bfloat16).
Everything the guidance math touches — latents, the DDIM update, energies, gradients to z, norms
and γ — lives in :data:`COMPUTE_DTYPE` (float32; float64 stays float64 so that float64 tests keep
their precision). The VAE runs in float32 when its config says ``force_upcast`` (or the policy says
``vae_upcast="always"``), else in the model dtype with a finite check that retries in float32.
An fp16 grad call multiplies the energy by a power-of-two *loss scale* before ``autograd.grad``
and divides the gradient by it in float32 (:func:`energy_grad_to_latent`), so that the upstream
gradients inside the fp16 UNet backward do not underflow.

Plain calls alone may run in a lower dtype than the model's (``RuntimeConfig.plain_dtype``):
bfloat16 autocast on CPUs with AVX-512 BF16 / AMX, float16 autocast on CUDA (issue 14, item 4);
the plain runner is wrapped by :func:`with_plain_dtype` and keeps the plain convention (float32
inputs and ε, only the UNet's matmuls and convolutions in the low dtype). ``"auto"`` is
:func:`default_plain_dtype`; ``dtype="auto"`` at load is :func:`default_model_dtype`. Measured (one
run, 2 busy cores; ``benchmarks/measure_plain_precision.py``): ``benchmarks/README.md``
"Precision of plain calls".
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from .errors import BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.float32
"""Dtype of latents, the DDIM update, energies, gradients to z, norms and γ (docs/precision.md §1)."""

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""Dtypes a model may be loaded in (float64 for tests only)."""

ModelDtype = torch.dtype | Literal["auto"]
"""A model dtype, or ``"auto"``: chosen per device and model size at load
(:func:`default_model_dtype`)."""

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


# --- low-precision plain calls and the "auto" dtypes ----------------------------------------

PLAIN_DTYPES = (torch.bfloat16, torch.float16)
SD_SIZE_CHANNELS = 1280
"""Widest UNet block (``block_out_channels``) from which bfloat16 plain calls pay off on CPU: SD
1.x/2.x UNets have 1280. Measured (benchmarks/README.md, "Plain calls on ONNX Runtime and in low
precision"): SD 1.5's architecture (1280) faster in bf16, the bundled (64) and golden (64) models
slower or even: their casts cost more than their small matmuls save. No width in between was measured."""

_logged_choices: set[str] = set()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (``avx2``, ``avx512f``, ...); empty where it is not readable."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return frozenset()
    line = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_has_bf16() -> bool:
    """The CPU has native bfloat16 arithmetic (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def check_plain_dtype(dtype: torch.dtype | None, device: torch.device) -> None:
    """Raise unless plain calls can autocast to ``dtype`` on ``device`` (``None`` always can)."""
    if dtype is None:
        return
    if dtype not in PLAIN_DTYPES:
        raise ConfigError(f"plain_dtype must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
    if device.type == "cpu" and dtype is torch.float16:
        raise ConfigError("plain_dtype=torch.float16 is for CUDA devices; on CPU use torch.bfloat16")
    if device.type == "cpu" and not cpu_has_bf16():
        raise BackendUnavailableError(
            "plain_dtype=torch.bfloat16 on CPU needs AVX-512 BF16 or AMX (not in this CPU's flags); without them "
            "bfloat16 is emulated and slower than float32: leave plain_dtype=None"
        )
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise BackendUnavailableError("plain_dtype=torch.bfloat16 needs a GPU with bfloat16 (Ampere or newer); use torch.float16")


class AutocastPlainRunner:
    """A plain runner whose UNet calls run under ``torch.autocast(device_type, dtype)``; ε float32."""

    def __init__(self, inner, dtype: torch.dtype, device_type: str) -> None:
        self.inner = inner
        self.dtype = dtype
        self.device_type = device_type
        self.name = f"{getattr(inner, 'name', 'plain')}+{str(dtype).removeprefix('torch.')}"

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extras: torch.Tensor
    ) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            eps = self.inner(latents, timestep, context, *extras)
        return eps.float()  # [B, 4, h, w]


def with_plain_dtype(runner, plain_dtype: torch.dtype | None, model_dtype: torch.dtype, device: torch.device):
    """``runner`` itself when plain calls run in the model dtype, else wrapped in autocast.

    For the ``onnx`` backend the dtype is the export's instead (a float16 graph), so it is not
    wrapped; its factory reads ``plain_dtype`` (:func:`~gnr_fast.runtime.onnx.runner.onnx_plain_runner`).
    """
    check_plain_dtype(plain_dtype, device)
    if plain_dtype is None or plain_dtype == model_dtype:
        return runner
    logger.info("plain UNet calls autocast to %s on %s", plain_dtype, device.type)
    return AutocastPlainRunner(runner, plain_dtype, device.type)


def bf16_plain_calls_pay_off(unet: torch.nn.Module) -> bool:
    """bfloat16 autocast makes this float32 UNet's plain calls faster than float32: the UNet is on a
    CPU with native bfloat16 (:func:`cpu_has_bf16`) and of SD size (widest block ≥ ``SD_SIZE_CHANNELS``).

    Not on CUDA: there the default is the model dtype (load the model in float16 for speed); nothing
    here was measured on a GPU.
    """
    weights = next(unet.parameters())
    widest = max(getattr(unet.config, "block_out_channels", (0,)))
    return weights.device.type == "cpu" and weights.dtype == torch.float32 and cpu_has_bf16() and widest >= SD_SIZE_CHANNELS


def _log_choice(unet: torch.nn.Module, choice: str, override: str) -> None:
    """Log a default chosen for ``unet`` once per distinct message, with the facts it rests on."""
    widest = max(getattr(unet.config, "block_out_channels", (0,)))
    text = f"{choice} (widest UNet block {widest} channels, native CPU bfloat16: {cpu_has_bf16()}); {override}"
    if text not in _logged_choices:
        _logged_choices.add(text)
        logger.info(text)


def default_model_dtype(unet: torch.nn.Module, device: torch.device) -> torch.dtype:
    """What ``dtype="auto"`` loads a model in, given its UNet loaded in float32 (still on the CPU)
    and the device it will run on: ``torch.bfloat16`` on a CPU where :func:`bf16_plain_calls_pay_off`
    (SD size, native bfloat16: the bf16 model measured 2.2× faster on a whole first edit of SD 1.5's
    architecture at 256², benchmarks/README.md), else ``torch.float32`` (on CUDA nothing was
    measured: load float16 explicitly). Logged once per answer."""
    chosen = torch.bfloat16 if device.type == "cpu" and bf16_plain_calls_pay_off(unet) else torch.float32
    _log_choice(unet, f"dtype='auto' loads the model in {str(chosen).removeprefix('torch.')} on {device.type}",
                "pass dtype= to choose")
    return chosen


def default_plain_dtype(unet: torch.nn.Module) -> torch.dtype | None:
    """What ``plain_dtype="auto"`` means for ``unet``: ``torch.bfloat16`` where
    :func:`bf16_plain_calls_pay_off`, else ``None`` (the model dtype). Logged once per answer."""
    chosen = torch.bfloat16 if bf16_plain_calls_pay_off(unet) else None
    _log_choice(unet, f"plain UNet calls default to {'bfloat16 autocast' if chosen else 'the model dtype'}",
                "set RuntimeConfig.plain_dtype to choose")
    return chosen
