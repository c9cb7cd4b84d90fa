"""The ``"tensorrt"`` backend: plain UNet calls on a TensorRT engine (TensorRT 10 Python API,
imported lazily; the engine is built by :mod:`gnr_fast.runtime.tensorrt.engine`).

:class:`TensorRTPlainUNet` implements the plain convention on an engine built by
:func:`gnr_fast.runtime.tensorrt.engine.build_engine`. Each optimisation profile gets its own
execution context (selected once, at load); a call picks the profile serving its rows and
latent size, sets the input shapes, binds torch CUDA tensors by address
(``set_tensor_address``) and enqueues the engine on torch's current stream
(``execute_async_v3``), so no copy and no synchronisation is added to the caller's stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import BackendUnavailableError, ConfigError, ExportError
from ...families import family_for
from ..export_info import INPUT_NAMES, OUTPUT_NAMES
from .engine import EngineRecord, require_tensorrt
from ...fingerprint import unet_fingerprint


class TensorRTPlainUNet:
    """Plain UNet calls (no grad, no captures) on a TensorRT engine on a CUDA device.

    Refuses (:class:`~gnr_fast.errors.ExportMismatchError`) an engine built from another UNet
    (``unet_id``, :func:`~gnr_fast.fingerprint.unet_fingerprint`), another TensorRT version or
    another GPU; raises :class:`~gnr_fast.errors.BackendUnavailableError` without TensorRT or CUDA.
    """

    name = "tensorrt"

    def __init__(self, engine: str | Path, unet_id: str, device: str | torch.device = "cuda") -> None:
        self.device = torch.device(device)
        trt = require_tensorrt("runtime 'tensorrt'", self.device)
        self.record = EngineRecord.read(engine)
        with torch.cuda.device(self.device):
            self.record.check(unet_id, trt.__version__, torch.cuda.get_device_name())
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine(Path(engine).read_bytes())
            if self.engine is None:
                raise ExportError(f"TensorRT could not load the engine {str(engine)!r}; build it again")
            if self.engine.num_optimization_profiles != len(self.record.profiles):
                raise ExportError(f"{str(engine)!r} has {self.engine.num_optimization_profiles} profiles, its record "
                                  f"{len(self.record.profiles)}: the files of two builds are mixed; build it again")
            stream = torch.cuda.current_stream(self.device)
            self.contexts: list[Any] = []
            for index in range(self.engine.num_optimization_profiles):
                context = self.engine.create_execution_context()
                context.set_optimization_profile_async(index, stream.cuda_stream)
                self.contexts.append(context)
            stream.synchronize()
        self.out_channels = self.record.export.out_channels

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """ε of ``latents`` [B, 4, h, w] at ``timestep`` (0-dim or [B]) under ``context`` ([B or 1, 77, C]);
        float32 [B, 4, h, w], enqueued on torch's current stream."""
        if latents.device != self.device:
            raise ConfigError(f"latents are on {latents.device}, the TensorRT engine on {self.device}; move them first")
        rows, size = latents.shape[0], (latents.shape[-2], latents.shape[-1])
        index = self.record.profile_for(rows, size)
        sample = latents.to(torch.float32).contiguous()  # [B, 4, h, w]
        t = torch.as_tensor(timestep, device=self.device).to(torch.float32).reshape(-1).expand(rows).contiguous()  # [B]
        ctx = context.to(self.device, torch.float32)
        ctx = (ctx.expand(rows, -1, -1) if ctx.shape[0] != rows else ctx).contiguous()  # [B, 77, C]
        out = torch.empty((rows, self.out_channels, *size), dtype=torch.float32, device=self.device)  # [B, 4, h, w]
        execution = self.contexts[index]
        for name, tensor in zip(INPUT_NAMES, (sample, t, ctx)):
            execution.set_input_shape(name, tuple(tensor.shape))
            execution.set_tensor_address(name, tensor.data_ptr())
        execution.set_tensor_address(OUTPUT_NAMES[0], out.data_ptr())
        if not execution.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise ExportError(f"TensorRT failed to run {self.record.path!r} on {rows} rows at {size}; see its log")
        return out


def tensorrt_plain_runner(unet: torch.nn.Module, config: Any) -> TensorRTPlainUNet:
    """The ``"tensorrt"`` plain backend's factory: ``(unet, RuntimeConfig) -> runner`` over
    ``config.tensorrt_engine`` (built by ``gnr-fast export tensorrt``)."""
    extra = [e.name for e in family_for(unet.config).extra_inputs]
    if extra:
        raise BackendUnavailableError(
            f"runtime 'tensorrt' binds sample, timestep and context only, not the extra UNet inputs {extra} this "
            "UNet needs (a consistency model); use runtime 'onnx', 'eager' or 'compiled'"
        )
    if config.tensorrt_engine is None:
        raise ConfigError("runtime 'tensorrt' needs RuntimeConfig.tensorrt_engine: an engine from `gnr-fast export tensorrt`")
    return TensorRTPlainUNet(config.tensorrt_engine, unet_fingerprint(unet), device=next(unet.parameters()).device)
