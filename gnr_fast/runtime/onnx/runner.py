"""The ``"onnx"`` backend: plain UNet calls on ONNX Runtime (DESIGN.md §9: ``plain`` calls may run on any backend).

:class:`OnnxPlainUNet` implements the plain convention
``(latents [B, 4, h, w], timestep 0-dim or [B], context [B or 1, 77, C], *extras [B, W]) -> eps [B, 4, h, w] float32``
(extras: the model family's extra inputs, e.g. a consistency UNet's ``timestep_cond``) on an export written by :func:`gnr_fast.runtime.onnx.export.export_onnx`: either exports made ahead of
time (``gnr-fast export onnx``), or made lazily on the first call of each latent size into a
cache folder keyed by model id, dtype, size and batch range (:func:`onnx_cache_key`).

Execution providers are chosen by named predicates and logged once (never by catching an
error): CPU for ``device="cpu"``; on CUDA devices the CUDA provider, or the TensorRT provider
when asked for, each only when ``onnxruntime-gpu`` offers it. Every call binds torch tensors by
address (IO binding): no copies through numpy. On the CPU provider a numpy round trip
(``session.run`` with ``.numpy()`` inputs and ``torch.from_numpy`` of the output) measured the
same as IO binding within noise on the tiny UNet (batch 2, 8² latent, medians of 300 interleaved
calls: 37.1 ms numpy vs 39.3 ms binding, one run on a machine at load 23 on 2 cores, so only the
ratio means anything): the CPU provider reads host memory either way; binding matters on CUDA,
where it keeps the tensors on the device.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ...errors import (
    BackendUnavailableError,
    ConfigError,
    ExportError,
    ExportMismatchError,
)
from ..export_info import (
    FORMAT_VERSION,
    INFO_FILE,
    INPUT_NAMES,
    METADATA_KEY,
    OUTPUT_NAMES,
    ExportInfo,
)
from ...families import family_for
from ...fingerprint import unet_fingerprint

logger = logging.getLogger(__name__)

Provider = Literal["auto", "cpu", "cuda", "tensorrt"]
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
_ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
CACHE_ENV = "GNR_FAST_CACHE"

_logged: set[str] = set()


def _log_once(message: str, *args: Any) -> None:
    text = message % args
    if text not in _logged:
        _logged.add(text)
        logger.info(text)


def onnxruntime_available() -> bool:
    """The ``onnxruntime`` (or ``onnxruntime-gpu``) package is installed."""
    return importlib.util.find_spec("onnxruntime") is not None


def onnx_unavailable_reason(device: torch.device, config: Any) -> str | None:
    """The registry's availability rule of the ``"onnx"`` backend: onnxruntime is installed (which
    provider serves ``device`` depends on ``config.onnx_provider``: :func:`choose_provider`)."""
    if not onnxruntime_available():
        return "onnxruntime is not installed; pip install 'gnr-fast[export]' (or onnxruntime-gpu on CUDA hosts)"
    return None


def onnx_detail() -> str:
    """What ``gnr-fast doctor`` reports: the onnxruntime version, its providers and the exporter."""
    import onnxruntime

    exporter = f"onnx {importlib.import_module('onnx').__version__}" if importlib.util.find_spec("onnx") else (
        "onnx not installed: export unavailable")
    return f"onnxruntime {onnxruntime.__version__} (providers: {', '.join(_offered())}); {exporter}"


def _offered() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def cuda_provider_offered() -> bool:
    """This onnxruntime build offers the CUDA execution provider (``onnxruntime-gpu``)."""
    return onnxruntime_available() and _ORT_NAMES["cuda"] in _offered()


def tensorrt_provider_offered() -> bool:
    """This onnxruntime build offers the TensorRT execution provider (``onnxruntime-gpu``)."""
    return onnxruntime_available() and _ORT_NAMES["tensorrt"] in _offered()


def choose_provider(requested: Provider, device: torch.device, dtype: str) -> str:
    """The provider key (``"cpu"``, ``"cuda"``, ``"tensorrt"``) a session for ``device`` runs on.

    ``"auto"`` is the CPU provider on CPU devices and the CUDA provider on CUDA devices (the
    TensorRT provider builds engines on first use, minutes for SD; it runs only when asked).
    Raises :class:`BackendUnavailableError` naming the missing package or provider.
    """
    if requested not in PROVIDERS:
        raise ConfigError(f"onnx provider must be one of {PROVIDERS}, got {requested!r}")
    reason = onnx_unavailable_reason(device, None)
    if reason is not None:
        raise BackendUnavailableError(f"runtime 'onnx' is unavailable: {reason}")
    if device.type == "cpu":
        if requested not in ("auto", "cpu"):
            raise ConfigError(f"onnx provider {requested!r} runs on CUDA devices, but device is 'cpu'; use provider 'cpu'")
        if dtype != "float32":
            raise BackendUnavailableError(
                f"ONNX Runtime's CPU provider runs float32 exports only, not {dtype}; export with --dtype float32 "
                "(or use runtime 'eager' with plain_dtype=bfloat16 for low precision on CPU)"
            )
        return "cpu"
    if device.type != "cuda":
        raise ConfigError(f"runtime 'onnx' runs on cpu or cuda devices, not {device.type!r}")
    key = "cuda" if requested == "auto" else requested
    if key == "cpu":
        raise ConfigError("onnx provider 'cpu' needs device 'cpu'; the model is on a CUDA device")
    offered = tensorrt_provider_offered() if key == "tensorrt" else cuda_provider_offered()
    if not offered:
        raise BackendUnavailableError(
            f"ONNX Runtime's {_ORT_NAMES[key]} is not offered by this onnxruntime build (it offers {_offered()}); "
            "pip uninstall onnxruntime && pip install onnxruntime-gpu (a build matching your CUDA), or use device 'cpu'"
        )
    return key


def default_cache_dir() -> Path:
    """Where lazy exports go: ``$GNR_FAST_CACHE/onnx``, else ``~/.cache/gnr-fast/onnx``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "gnr-fast") / "onnx"


def onnx_cache_key(unet_id: str, dtype: str, latent_size: tuple[int, int], batch: tuple[int, int]) -> str:
    """The cache folder name of a lazy export: one per UNet, dtype, latent size and batch range."""
    h, w = latent_size
    return f"{unet_id}-{dtype}-{h}x{w}-b{batch[0]}-{batch[1]}-v{FORMAT_VERSION}"


class _Session:
    """One ONNX Runtime session on one export, with the record it was made with."""

    def __init__(self, folder: Path, provider: str, device: torch.device) -> None:
        import onnxruntime

        info = ExportInfo.read(folder)
        path = folder / info.onnx_file
        if not path.is_file():
            raise ExportError(f"{str(path)!r} is missing from the export {str(folder)!r}; export it again")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same CPU budget as the eager calls
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[Any] = [_ORT_NAMES["cpu"]]
        if provider != "cpu":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda_options = {"device_id": index, "user_compute_stream": str(torch.cuda.current_stream(index).cuda_stream)}
            providers = [(_ORT_NAMES["cuda"], cuda_options)] + providers
            if provider == "tensorrt":
                trt_options = {"device_id": index, "trt_fp16_enable": info.dtype == "float16",
                               "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder / "trt-ep-cache")}
                providers = [(_ORT_NAMES["tensorrt"], trt_options)] + providers
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
        stored = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if stored is None:
            raise ExportError(f"{str(path)!r} carries no gnr-fast export record; export it with `gnr-fast export onnx`")
        self.info = ExportInfo.from_json(stored, str(path))
        if self.info != info:
            raise ExportMismatchError(
                f"{str(folder / INFO_FILE)!r} does not describe {str(path)!r} (files of two exports mixed); export again"
            )
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (list(self.info.input_names), list(OUTPUT_NAMES)):
            raise ExportError(f"{str(path)!r} has inputs/outputs {names}, its record says {list(self.info.input_names)} "
                              f"-> {list(OUTPUT_NAMES)}; export it again")
        self.folder = folder
        self.device = device
        self.device_type = "cpu" if provider == "cpu" else "cuda"
        self.device_id = 0 if provider == "cpu" else (device.index or 0)
        self.stream = None if provider == "cpu" else torch.cuda.current_stream(self.device_id)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """ε of contiguous float32 tensors on the session's device (one per name of the record's
        ``input_names``: sample, timestep, context, extras), bound by address."""
        sample = inputs[0]
        import numpy as np

        out = torch.empty(
            (sample.shape[0], self.info.out_channels, *sample.shape[2:]), dtype=torch.float32, device=sample.device
        )  # [B, 4, h, w]
        if self.stream is not None and torch.cuda.current_stream(self.device_id) != self.stream:
            torch.cuda.current_stream(self.device_id).synchronize()  # ORT computes on the stream it was given
        binding = self.session.io_binding()
        for name, tensor in zip(self.info.input_names, inputs, strict=True):
            binding.bind_input(name, self.device_type, self.device_id, np.float32, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output(OUTPUT_NAMES[0], self.device_type, self.device_id, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


class OnnxPlainUNet:
    """Plain UNet calls (no grad, no captures) on ONNX Runtime.

    ``exports``: folders written by :func:`~gnr_fast.runtime.onnx.export.export_onnx`, each refused unless it
    was made from the UNet ``unet_id`` (:func:`~gnr_fast.fingerprint.unet_fingerprint`) in
    ``dtype`` and taking the inputs ``input_names`` (the UNet family's, default SD's plain three).
    Given exports made from other UNets are passed over when at least one is of this UNet (a
    consistency model's two UNets share one list). ``unet`` (optional): the diffusers UNet to export from
    when a call needs a latent size no given export serves; the export is written once into
    ``cache_dir`` (default :func:`default_cache_dir`) and reused by later processes. Without
    ``unet`` such a call raises :class:`ExportMismatchError`. Thread-safe: a lock guards the
    exports; ONNX Runtime sessions accept concurrent runs.
    """

    name = "onnx"

    def __init__(
        self,
        unet_id: str,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        provider: Provider = "auto",
        exports: Sequence[str | Path] = (),
        unet: torch.nn.Module | None = None,
        cache_dir: str | Path | None = None,
        batch: tuple[int, int] = (1, 4),
        input_names: Sequence[str] = INPUT_NAMES,
    ) -> None:
        self.unet_id = unet_id
        self.input_names = tuple(input_names)
        self.dtype = dtype
        self.device = torch.device(device)
        self.provider = choose_provider(provider, self.device, dtype)
        _log_once("plain UNet calls run on ONNX Runtime's %s (device %s, %s)", _ORT_NAMES[self.provider], self.device, dtype)
        self.unet = unet
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.batch = batch
        self._lock = threading.Lock()
        self._sessions: dict[tuple[int, int], _Session] = {}
        sessions = [_Session(Path(folder), self.provider, self.device) for folder in exports]
        own = [s for s in sessions if s.info.unet_id == unet_id]
        for session in own or sessions:  # none of this UNet: each is refused by _add, with the reason
            self._add(session)
        if not exports and unet is None:
            raise ConfigError("OnnxPlainUNet needs exports= (folders from `gnr-fast export onnx`) or unet= to export from")

    def _add(self, session: _Session) -> None:
        session.info.check(unet_id=self.unet_id, dtype=self.dtype, input_names=self.input_names,
                           where=f"ONNX export {str(session.folder)!r}")
        for size in session.info.latent_sizes:
            self._sessions.setdefault(size, session)

    def session_for(self, latent_size: tuple[int, int]) -> _Session:
        """The session serving ``latent_size``: a given export, the cache, or a new lazy export."""
        session = self._sessions.get(latent_size)
        if session is not None:
            return session
        with self._lock:
            if latent_size in self._sessions:
                return self._sessions[latent_size]
            if self.unet is None:
                served = sorted(self._sessions)
                raise ExportMismatchError(
                    f"no ONNX export serves latent size {latent_size} (h, w); the exports serve {served}. Export this "
                    "size with `gnr-fast export onnx --height H --width W` (H, W = 8 x latent) or pass unet= to export lazily"
                )
            folder = self.cache_dir / onnx_cache_key(self.unet_id, self.dtype, latent_size, self.batch)
            if not (folder / INFO_FILE).is_file():
                from .export import export_unet_onnx

                logger.info("exporting the UNet for latent size %s into %s (once per model, dtype and size)", latent_size, folder)
                export_unet_onnx(self.unet, folder, dtype=self.dtype, latent_sizes=(latent_size,), batch=self.batch)
            session = _Session(folder, self.provider, self.device)
            session.info.check(latent_size=latent_size, batch=self.batch[1], where=f"cached ONNX export {str(folder)!r}")
            self._add(session)
            return session

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extras: torch.Tensor
    ) -> torch.Tensor:
        """ε (or v) of ``latents`` [B, 4, h, w] at ``timestep`` (0-dim or [B]) under ``context``
        ([B, 77, C], or [1, 77, C] for every row) with the family's ``extras`` ([B, W] each, one per
        input name after the third); float32 [B, 4, h, w] on the latents' device."""
        if len(extras) != len(self.input_names) - 3:
            raise ConfigError(f"this ONNX UNet takes inputs {list(self.input_names)}: {len(self.input_names) - 3} "
                              f"extra tensor(s) after latents, timestep and context, got {len(extras)}")
        rows, size = latents.shape[0], (latents.shape[-2], latents.shape[-1])
        session = self.session_for(size)
        session.info.check(batch=rows, where=f"ONNX export {str(session.folder)!r}")
        if latents.device != self.device:
            raise ConfigError(f"latents are on {latents.device}, the ONNX session on {self.device}; move them first")
        sample = latents.to(torch.float32).contiguous()  # [B, 4, h, w]
        t = torch.as_tensor(timestep, device=self.device).to(torch.float32).reshape(-1).expand(rows).contiguous()  # [B]
        ctx = context.to(self.device, torch.float32)
        if ctx.shape[0] != rows:
            ctx = ctx.expand(rows, -1, -1)
        rest = tuple(e.to(self.device, torch.float32).contiguous() for e in extras)  # [B, W] each
        return session.run(sample, t, ctx.contiguous(), *rest)  # [B, 4, h, w]


def onnx_plain_runner(unet: torch.nn.Module, config: Any) -> OnnxPlainUNet:
    """The ``"onnx"`` plain backend's factory (:mod:`gnr_fast.runtime.registry`): ``(unet, RuntimeConfig) -> runner``.

    Reads ``config.onnx_exports`` (folders made ahead of time; others are made lazily from
    ``unet``), ``config.onnx_provider``, ``config.export_cache_dir`` (``None``: the default cache)
    and ``config.plain_dtype`` (``None``: the UNet's dtype; ``torch.float16`` exports a float16
    graph, for the CUDA and TensorRT providers).
    """
    weights = next(unet.parameters())
    dtype = config.plain_dtype or weights.dtype
    return OnnxPlainUNet(
        unet_fingerprint(unet),
        dtype=str(dtype).removeprefix("torch."),
        device=weights.device,
        provider=config.onnx_provider,
        exports=config.onnx_exports,
        unet=unet,
        cache_dir=config.export_cache_dir,
        input_names=family_for(unet.config).export_io.inputs,
    )
