"""ONNX export → TensorRT engine for the plain calls (``gnr-fast export tensorrt``).

The engine is built with one optimisation profile per working size of the ONNX export; each
profile's batch range covers the rows of the plain calls the edit plans make
(:func:`plain_row_counts`, from :func:`gnr_fast.fast.plan.plan_edit`: 1 row for the inversion, 1
or 2 for ε_u / ε_trg, times the edits a server batches), with the most frequent count as the
profile's optimum. A timing cache (``ENGINE.timing``) makes rebuilds fast. The engine's record
(``ENGINE.json``: the export it was built from, the profiles, TensorRT's version and the GPU) lets
:class:`~gnr_fast.runtime.tensorrt.runner.TensorRTPlainUNet` refuse an engine built for another UNet,
TensorRT version or GPU — engines are not portable across either.

TensorRT (10.x Python API) is imported lazily: without it every entry point raises
:class:`~gnr_fast.errors.BackendUnavailableError` naming what is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import (
    BackendUnavailableError,
    ConfigError,
    ExportError,
    ExportMismatchError,
)
from ..export_info import INPUT_NAMES, ExportInfo

logger = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
TIMING_SUFFIX = ".timing"
ENGINE_FORMAT_VERSION = 1


def tensorrt_available() -> bool:
    """The ``tensorrt`` Python package is importable (it ships from NVIDIA's package index)."""
    return importlib.util.find_spec("tensorrt") is not None


def tensorrt_unavailable_reason(device: Any = None, config: Any = None) -> str | None:
    """The registry's availability rule of the ``"tensorrt"`` backend (and of engine builds): the
    ``tensorrt`` package is installed and a CUDA device is visible (``device``, when given, is one)."""
    import torch

    if not tensorrt_available():
        return ("NVIDIA TensorRT 10 is not installed: pip install tensorrt-cu12 (its libraries come from NVIDIA's "
                "package index) on a host with an NVIDIA GPU; or use runtime 'onnx' (ONNX Runtime)")
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False here"
    if device is not None and torch.device(device).type != "cuda":
        return f"TensorRT runs on CUDA devices, not {str(device)!r}"
    return None


def tensorrt_detail() -> str:
    """What ``gnr-fast doctor`` reports when TensorRT is available."""
    import tensorrt

    return f"tensorrt {tensorrt.__version__}"


def require_tensorrt(what: str, device: Any = None):
    """Import ``tensorrt`` after :func:`tensorrt_unavailable_reason`, or raise naming what is missing."""
    reason = tensorrt_unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"{what} is unavailable: {reason}")
    import tensorrt

    return tensorrt


@dataclass(frozen=True)
class EngineProfile:
    """One optimisation profile: a latent size and the (min, opt, max) rows per call."""

    latent_size: tuple[int, int]
    min_batch: int
    opt_batch: int
    max_batch: int

    def shapes(self, info: ExportInfo) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of every input of the export (names of :data:`INPUT_NAMES`)."""
        h, w = self.latent_size

        def per_rows(*tail: int) -> tuple[tuple[int, ...], ...]:
            return tuple((rows, *tail) for rows in (self.min_batch, self.opt_batch, self.max_batch))

        sample, timestep, context = INPUT_NAMES
        return {
            sample: per_rows(info.in_channels, h, w),
            timestep: per_rows(),
            context: per_rows(info.context_len, info.context_dim),
        }

    def serves(self, rows: int, latent_size: tuple[int, int]) -> bool:
        return tuple(latent_size) == self.latent_size and self.min_batch <= rows <= self.max_batch


def plain_row_counts(configs, num_steps: int = 50) -> Counter:
    """How many plain calls of each row count the edits of ``configs`` make (first and repeat edits,
    plus the inversion's one-row calls): the rows of each step's no-grad call that nobody captures."""
    from ...fast.plan import plan_edit

    counts: Counter = Counter({1: num_steps})  # the inversion: one row per step
    for config in configs:
        for source_cached in (False, True):
            for step in plan_edit(config, source_cached=source_cached):
                for call in step.calls:
                    if not call.grad:
                        rows = sum(1 for row in call.rows if row.role is None)
                        if rows:
                            counts[rows] += 1
    return counts


def profiles_from_plans(info: ExportInfo, configs, num_steps: int = 50, edits_per_call: int = 1) -> tuple[EngineProfile, ...]:
    """One profile per latent size of ``info``: rows from 1 to the most a plain call of ``configs``
    needs (× ``edits_per_call`` edits sharing calls on a server), the most frequent count as optimum."""
    if isinstance(edits_per_call, bool) or not isinstance(edits_per_call, int) or edits_per_call < 1:
        raise ConfigError(f"edits_per_call must be a positive integer, got {edits_per_call!r}")
    counts = plain_row_counts(configs, num_steps)
    most = max(counts) * edits_per_call
    if most > info.max_batch:
        raise ExportError(
            f"the plans need plain calls of up to {most} rows but the ONNX export serves at most {info.max_batch}; "
            f"export again with --max-batch {most}"
        )
    opt = counts.most_common(1)[0][0] * edits_per_call
    low = max(1, info.min_batch)
    return tuple(EngineProfile(size, low, max(low, opt), most) for size in info.latent_sizes)


def profiles_for_presets(onnx_dir: str | Path, preset: str | None = None, num_steps: int = 50) -> tuple[EngineProfile, ...]:
    """The profiles of ``gnr-fast export tensorrt``: the plans of ``preset`` (``None``: every preset)."""
    from ...config import PRESET_NAMES, EditConfig

    names = PRESET_NAMES if preset is None else (preset,)
    return profiles_from_plans(ExportInfo.read(onnx_dir), [EditConfig.preset(n, num_steps) for n in names], num_steps)


def engine_cache_key(info: ExportInfo, profiles: tuple[EngineProfile, ...], fp16: bool, tensorrt_version: str, device_name: str) -> str:
    """A short id of an engine build: the export, the profiles, precision, TensorRT and the GPU."""
    payload = json.dumps(
        {"export": info.to_json(), "profiles": [asdict(p) for p in profiles], "fp16": fp16,
         "tensorrt": tensorrt_version, "device": device_name, "format": ENGINE_FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EngineRecord:
    """What an engine file was built from and for; stored as ``ENGINE.json`` beside it."""

    export: ExportInfo
    profiles: tuple[EngineProfile, ...]
    fp16: bool
    tensorrt_version: str
    device_name: str
    key: str
    path: str
    format_version: int = ENGINE_FORMAT_VERSION

    def write(self) -> Path:
        path = Path(self.path + RECORD_SUFFIX)
        data = {**asdict(self), "export": json.loads(self.export.to_json())}
        path.write_text(json.dumps(data, sort_keys=True, indent=1) + "\n")
        return path

    @classmethod
    def read(cls, engine: str | Path) -> EngineRecord:
        path = Path(str(engine) + RECORD_SUFFIX)
        if not path.is_file():
            raise ExportError(
                f"{str(path)!r} not found: {str(engine)!r} is not an engine built by `gnr-fast export tensorrt`; build it "
                "with `gnr-fast export tensorrt --onnx DIR --out ENGINE`"
            )
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != ENGINE_FORMAT_VERSION:
                raise ExportMismatchError(
                    f"{str(path)!r} has engine record format {data.get('format_version')!r}, this gnr-fast reads "
                    f"{ENGINE_FORMAT_VERSION}; build the engine again"
                )
            export = ExportInfo.from_json(json.dumps(data.pop("export")), str(path))
            profiles = tuple(
                EngineProfile(tuple(p["latent_size"]), p["min_batch"], p["opt_batch"], p["max_batch"])
                for p in data.pop("profiles")
            )
            return cls(export=export, profiles=profiles, **data)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ExportError(f"{str(path)!r} is not a valid engine record ({exc}); build the engine again") from exc

    def check(self, unet_id: str, tensorrt_version: str, device_name: str) -> None:
        """Raise :class:`ExportMismatchError` unless the engine fits this UNet, TensorRT and GPU."""
        self.export.check(unet_id=unet_id, where=f"TensorRT engine {self.path!r}")
        if tensorrt_version != self.tensorrt_version:
            raise ExportMismatchError(
                f"TensorRT engine {self.path!r} was built with TensorRT {self.tensorrt_version}, this is "
                f"{tensorrt_version}; engines do not carry across versions: build it again"
            )
        if device_name != self.device_name:
            raise ExportMismatchError(
                f"TensorRT engine {self.path!r} was built for {self.device_name!r}, this GPU is {device_name!r}; "
                "build it again on this GPU"
            )

    def profile_for(self, rows: int, latent_size: tuple[int, int]) -> int:
        """Index of the profile serving ``rows`` at ``latent_size``; :class:`ExportMismatchError` if none."""
        for index, profile in enumerate(self.profiles):
            if profile.serves(rows, latent_size):
                return index
        served = [(p.latent_size, f"{p.min_batch}..{p.max_batch}") for p in self.profiles]
        raise ExportMismatchError(
            f"TensorRT engine {self.path!r} has no profile for {rows} rows at latent size {tuple(latent_size)}; it serves "
            f"{served}. Build it again from an export of this size"
        )


def build_engine(
    onnx_dir: str | Path,
    out: str | Path,
    fp16: bool = False,
    profiles: tuple[EngineProfile, ...] | None = None,
    timing_cache: str | Path | None = None,
    workspace_mb: int = 4096,
) -> EngineRecord:
    """Build a TensorRT engine from the ONNX export in ``onnx_dir`` into ``out`` (+ ``out.json``).

    ``profiles``: default :func:`profiles_for_presets` of every preset. ``timing_cache``: read if
    present and written back (default ``out.timing``). ``fp16`` lets TensorRT pick float16
    kernels (the engine's IO stays float32, as in the ONNX graph).
    """
    trt = require_tensorrt("gnr-fast export tensorrt")
    import torch

    info = ExportInfo.read(onnx_dir)
    profiles = profiles if profiles is not None else profiles_for_presets(onnx_dir)
    if not profiles:
        raise ExportError("no optimisation profile to build; give at least one")
    for profile in profiles:
        info.check(latent_size=profile.latent_size, batch=profile.max_batch, where=f"ONNX export {str(onnx_dir)!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = Path(timing_cache) if timing_cache is not None else Path(str(out) + TIMING_SUFFIX)
    device_name = torch.cuda.get_device_name()

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    onnx_path = Path(onnx_dir) / info.onnx_file
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {str(onnx_path)!r}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb * 1024**2)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in profiles:
        optimisation = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes(info).items():
            optimisation.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimisation)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {str(onnx_path)!r}; see TensorRT's log above")
    out.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    record = EngineRecord(
        export=info, profiles=tuple(profiles), fp16=fp16, tensorrt_version=trt.__version__, device_name=device_name,
        key=engine_cache_key(info, tuple(profiles), fp16, trt.__version__, device_name), path=str(out),
    )
    record.write()
    logger.info("built TensorRT engine %s (%d profiles, fp16=%s) in %.0fs", out, len(profiles), fp16, time.perf_counter() - start)
    return record
