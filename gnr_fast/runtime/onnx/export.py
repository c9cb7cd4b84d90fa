"""UNet → ONNX for the plain calls (DESIGN.md §8–9: unguided passes on an exported engine).

The exported graph is diffusers' UNet with its *default* attention processors (a fresh copy of
the weights: the editor's instrumented UNet is never touched) behind the signature its model
family declares (:attr:`gnr_fast.families.ModelFamily.export_io`)::

    sample [B, 4, h, w] float32, timestep [B] float32, context [B, 77, C] float32, *extras [B, W] float32
        -> eps [B, 4, h, w] float32

(no extras for SD 1.x/2.x; ``timestep_cond`` for guidance-embedding UNets: consistency models).

The inputs are cast to the export dtype inside the graph and ε back to float32, so callers bind
the same float32 tensors whatever the export's precision (the project's policy: latents live in
float32, only the UNet runs in the model dtype). The batch and the spatial axes are dynamic; the
export records the latent sizes it was made for and serves only those (:class:`ExportInfo`).

Exporter choice (``exporter=``): ``"torchscript"`` (``torch.onnx.export(..., dynamo=False)``) is the
default: on the tiny test UNet it exported in 12.6 s against 120 s for ``"dynamo"`` (torch 2.13,
diffusers 0.42.1, one run each, 2 busy cores) with the same ε (5.6e-7 vs 6.0e-7 relative to
eager, batch 1–3). torch marks the TorchScript exporter deprecated; ``"dynamo"`` needs the
``onnxscript`` package (in the ``export`` extra) and makes one graph per working size: with
``Dim.AUTO`` spatial axes it specialised them to the traced size silently (a 16² call of an 8²
trace failed in ORT), so only its batch axis is dynamic.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ...errors import BackendUnavailableError, ExportError
from ...families import ExportIO, family_for
from ...fingerprint import unet_fingerprint
from ..export_info import (
    EXPORT_DTYPES,
    INFO_FILE,
    METADATA_KEY,
    ExportInfo,
)

logger = logging.getLogger(__name__)

Exporter = Literal["torchscript", "dynamo"]
EXPORTERS = ("torchscript", "dynamo")
MIN_OPSET = 18  # LayerNormalization / GroupNormalization-era opsets; what ORT and TensorRT 10 parse
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's 2 GB limit on one message (SD 1.x fp32 UNet: 3.4 GB)
DATA_SUFFIX = ".data"


@dataclass(frozen=True)
class ExportTimings:
    """Seconds spent in each stage of one export (for the benchmarks)."""

    trace_s: float
    save_s: float
    check_s: float


def onnx_available() -> bool:
    """The ``onnx`` package is installed (``pip install 'gnr-fast[export]'``)."""
    return importlib.util.find_spec("onnx") is not None


def dynamo_exporter_available() -> bool:
    """The torch.export-based ONNX exporter can run: it translates through ``onnxscript``."""
    return importlib.util.find_spec("onnxscript") is not None


class _ExportedUNet(torch.nn.Module):
    """The exported signature: float32 IO, the UNet in its own dtype in between."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.unet = unet
        self.dtype = dtype
        self.family = family_for(unet.config)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extras: torch.Tensor
    ) -> torch.Tensor:
        out = self.family.call_unet(self.unet, sample.to(self.dtype), timestep, context.to(self.dtype),
                                    tuple(extra.to(self.dtype) for extra in extras))
        return out.float()  # [B, 4, h, w]


def fresh_unet(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A CPU copy of ``unet``'s weights in ``dtype`` with diffusers' default attention processors.

    A copy, so that the caller's UNet (with the editor's capture processors) stays as it is.
    """
    from diffusers import UNet2DConditionModel

    copy = UNet2DConditionModel.from_config(unet.config)
    state = {k: v.detach().to("cpu") for k, v in unet.state_dict().items()}
    missing, unexpected = copy.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"the UNet's weights do not fit its own config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "export from a diffusers UNet2DConditionModel loaded with from_pretrained"
        )
    copy.set_default_attn_processor()
    if dtype != torch.float32:
        copy = copy.to(dtype)
    return copy.eval().requires_grad_(False)


def check_export_request(
    latent_sizes: Sequence[tuple[int, int]], batch: tuple[int, int], dtype: str, exporter: str, opset: int,
    size_multiple: int,
) -> None:
    """Validate the arguments of an export before any work (messages name argument, value, fix)."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "dynamo" and not dynamo_exporter_available():
        raise BackendUnavailableError(
            "exporter='dynamo' needs the onnxscript package; pip install 'gnr-fast[export]' or use exporter='torchscript'"
        )
    if not onnx_available():
        raise BackendUnavailableError("exporting to ONNX needs the onnx package; pip install 'gnr-fast[export]'")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    lo, hi = batch
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 64):
        raise ExportError(f"batch range must be two integers 1 <= min <= max <= 64, got {batch!r}")
    if not latent_sizes:
        raise ExportError("give at least one working size to export for")
    if exporter == "dynamo" and len(latent_sizes) > 1:
        raise ExportError(
            f"exporter='dynamo' makes a graph for one working size, got {len(latent_sizes)}; export each size into "
            "its own folder, or use exporter='torchscript' (one graph with dynamic height and width)"
        )
    for h, w in latent_sizes:
        if h < size_multiple or w < size_multiple or h % size_multiple or w % size_multiple:
            raise ExportError(
                f"latent size {(h, w)} is not a positive multiple of {size_multiple} (the UNet's downsampling); "
                f"use image sides that are multiples of {8 * size_multiple}"
            )


def export_unet_onnx(
    unet: torch.nn.Module,
    out_dir: str | Path,
    dtype: str = "float32",
    latent_sizes: Sequence[tuple[int, int]] = ((64, 64),),
    batch: tuple[int, int] = (1, 4),
    exporter: Exporter = "torchscript",
    opset: int = MIN_OPSET,
    external_data: bool | None = None,
    model_id: str = "",
) -> tuple[ExportInfo, ExportTimings]:
    """Export ``unet`` (a diffusers ``UNet2DConditionModel``) for plain calls into ``out_dir``.

    Writes ``unet.onnx`` (plus ``unet.onnx.data`` when ``external_data``, by default when the
    weights exceed 2 GB) and ``export.json``, checks the file with ``onnx.checker``, and returns
    the record stored in it. ``out_dir`` is written through a temporary sibling folder and
    replaced whole, so a reader never sees half an export; it must be absent, empty or an
    earlier export.
    """
    import onnx

    from ...version import __version__

    latent_sizes = tuple(dict.fromkeys((int(h), int(w)) for h, w in latent_sizes))
    size_multiple = 2 ** (len(unet.config.block_out_channels) - 1)
    check_export_request(latent_sizes, batch, dtype, exporter, opset, size_multiple)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / INFO_FILE).is_file():
        raise ExportError(f"{str(out_dir)!r} is not empty and not a gnr-fast export; choose another --out")
    torch_dtype = getattr(torch, dtype)
    model = _ExportedUNet(fresh_unet(unet, torch_dtype), torch_dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data

    cfg = unet.config
    h, w = latent_sizes[0]
    trace_batch = min(2, batch[1])  # never trace at 1: a size-1 axis can be specialised as broadcast
    sample = torch.randn(trace_batch, cfg.in_channels, h, w)
    timestep = torch.full((trace_batch,), 500.0)
    context = torch.randn(trace_batch, 77, cfg.cross_attention_dim)
    extras = tuple(torch.randn(trace_batch, extra.width) for extra in model.family.extra_inputs)
    io = model.family.export_io

    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "raw").mkdir(parents=True)
    try:
        start = time.perf_counter()
        raw = staging / "raw" / "unet.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # Expected and harmless here: the TorchScript exporter's deprecation notice, and tracer
            # notes on diffusers' shape checks (constants for the traced sizes, which the export serves).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="The feature will be removed.*")
            _run_exporter(model, (sample, timestep, context, *extras), raw, exporter, opset, batch, io)
        trace_s = time.perf_counter() - start

        start = time.perf_counter()
        info = ExportInfo(
            unet_id=unet_fingerprint(unet),
            model_id=model_id,
            input_names=io.inputs,
            dtype=dtype,
            latent_sizes=latent_sizes,
            min_batch=batch[0],
            max_batch=batch[1],
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            context_len=77,
            context_dim=cfg.cross_attention_dim,
            exporter=exporter,
            opset=opset,
            gnr_fast_version=__version__,
            external_data=external,
            torch_version=torch.__version__,
        )
        proto = onnx.load(str(raw), load_external_data=True)
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, info.to_json()
        final = staging / info.onnx_file
        onnx.save_model(
            proto, str(final), save_as_external_data=external, all_tensors_to_one_file=True,
            location=info.onnx_file + DATA_SUFFIX, size_threshold=1024,
        )
        del proto
        shutil.rmtree(staging / "raw")
        info.write(staging)
        save_s = time.perf_counter() - start

        start = time.perf_counter()
        try:
            onnx.checker.check_model(str(final))  # the path form reads external data (> 2 GB models)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported ONNX graph failed onnx.checker: {exc}") from exc
        check_s = time.perf_counter() - start

        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    timings = ExportTimings(trace_s=trace_s, save_s=save_s, check_s=check_s)
    logger.info("exported UNet %s (%s, latent sizes %s) to %s in %.1fs", info.unet_id, dtype,
                list(latent_sizes), out_dir, trace_s + save_s + check_s)
    return info, timings


def _run_exporter(
    model: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, exporter: str, opset: int,
    batch: tuple[int, int], io: ExportIO,
) -> None:
    """One ``torch.onnx.export`` call with the exporter named explicitly, the family's input and
    output names (``args`` in the order of ``io.inputs``) and the axes made dynamic."""
    if exporter == "torchscript":
        torch.onnx.export(
            model, args, str(path), input_names=list(io.inputs), output_names=list(io.outputs),
            opset_version=opset, dynamic_axes={k: dict(v) for k, v in io.dynamic_axes.items()},
            do_constant_folding=True, dynamo=False,
        )
        return
    rows = torch.export.Dim("batch", min=batch[0], max=batch[1])
    # Spatial axes stay static: with Dim.AUTO torch.export specialised them to the traced size
    # anyway (attention's baddbmm then failed at 16² for a graph traced at 8²).
    # positional: sample, timestep, context, then forward's *extras as one nested tuple (torch.export's
    # structure for a var-positional argument; left out when there are none)
    extras = (tuple({0: rows} for _ in args[3:]),) if len(args) > 3 else ()
    shapes = ({0: rows}, {0: rows}, {0: rows}, *extras)
    torch.onnx.export(
        model, args, str(path), input_names=list(io.inputs), output_names=list(io.outputs),
        opset_version=opset, dynamic_shapes=shapes, dynamo=True, external_data=True,
    )


def export_onnx(
    model: str | Path | Any | None,
    out_dir: str | Path,
    dtype: str = "float32",
    sizes: Sequence[tuple[int, int]] = ((512, 512),),
    batch: tuple[int, int] = (1, 4),
    exporter: Exporter = "torchscript",
    opset: int = MIN_OPSET,
    external_data: bool | None = None,
) -> ExportInfo:
    """Export the UNet of ``model`` for plain calls; the Python face of ``gnr-fast export onnx``.

    ``model``: a diffusers SD 1.x/2.x folder (``None``: the bundled model), loaded in float32, or
    already loaded :class:`~gnr_fast.loading.Components`; the export is matched to UNets by
    :func:`~gnr_fast.fingerprint.unet_fingerprint` (float32 weights), whatever its ``dtype``. ``sizes`` are image
    (height, width) pairs in pixels, each side a multiple of 64; ``batch`` the (min, max) rows per
    call. See :func:`export_unet_onnx` for the files written.
    """
    from ...loading import Components, load_components

    components = model if isinstance(model, Components) else load_components(model, dtype=torch.float32)
    factor = components.latent_factor
    for height, width in sizes:
        if height % factor or width % factor:
            raise ExportError(f"image size {height}x{width} is not a multiple of {factor}; use sides that are multiples of 64")
    latent_sizes = tuple((height // factor, width // factor) for height, width in sizes)
    info, _ = export_unet_onnx(
        components.unet, out_dir, dtype=dtype, latent_sizes=latent_sizes, batch=batch,
        exporter=exporter, opset=opset, external_data=external_data, model_id=components.model_id,
    )
    return info
