"""Low precision for plain calls only: bfloat16 autocast on CPUs with AVX-512 BF16 / AMX, float16
autocast on CUDA (issue 14, item 4), independent of the model dtype the capturing and grad calls use.

``RuntimeConfig.plain_dtype`` (``None``, the default, = the model's dtype; ``"auto"`` =
:func:`default_plain_dtype`) selects it; the plain runner is wrapped by :func:`with_plain_dtype`. The wrapped runner keeps the plain convention: its
inputs and ε are float32, only the UNet's matmuls and convolutions run in the low dtype.

Measured (one run, 2 busy cores; ``benchmarks/measure_plain_precision.py``): see
``benchmarks/README.md`` "Precision of plain calls".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

PLAIN_DTYPES = (torch.bfloat16, torch.float16)
SD_SIZE_CHANNELS = 1280
"""Widest UNet block (``block_out_channels``) from which bfloat16 plain calls pay off on CPU: SD
1.x/2.x UNets have 1280. Measured (benchmarks/README.md, "Plain calls on ONNX Runtime and in low
precision"): SD 1.5's architecture (1280) faster in bf16, the bundled (64) and golden (64) models
slower or even: their casts cost more than their small matmuls save. No width in between was measured."""

_logged: set[str] = set()


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

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            eps = self.inner(latents, timestep, context)
        return eps.float()  # [B, 4, h, w]


def with_plain_dtype(runner, plain_dtype: torch.dtype | None, model_dtype: torch.dtype, device: torch.device):
    """``runner`` itself when plain calls run in the model dtype, else wrapped in autocast.

    For the ``onnx`` backend the dtype is the export's instead (a float16 graph), so it is not
    wrapped; the caller passes ``plain_dtype`` to :func:`~gnr_fast.runtime.onnx.onnx_plain_runner`.
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
    if text not in _logged:
        _logged.add(text)
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


def resolve_plain_dtype(config: Any, unet: torch.nn.Module) -> Any:
    """``config`` (a :class:`~gnr_fast.runtime.config.RuntimeConfig`) with ``plain_dtype="auto"``
    replaced by :func:`default_plain_dtype` of ``unet``; other configs as they are. Exported
    backends (``onnx``, ``tensorrt``) run their export's dtype: "auto" is the model dtype there."""
    if config.plain_dtype != "auto":
        return config
    exported = config.plain in ("onnx", "tensorrt")
    return dataclasses.replace(config, plain_dtype=None if exported else default_plain_dtype(unet))
