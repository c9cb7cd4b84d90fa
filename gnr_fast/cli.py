"""The ``gnr-fast`` command line: ``edit``, ``invert`` (and the subcommands later issues add)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import warnings
from pathlib import Path
from typing import Sequence

from . import demo
from .config import ALL_PRESET_NAMES, PRESET_NAMES
from .model_defaults import SAMPLER_NAMES
from .cli_parser import CliParser
from .errors import ConfigError, GnrError
from .outputs import check_writable_file
from .runtime.config import runtime_names
from .runtime.registry import backend_spec

logger = logging.getLogger("gnr_fast.cli")

DTYPES = ("float32", "float16", "bfloat16")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="local diffusers SD 1.x/2.x folder, single-file .safetensors/.ckpt, or a hub id org/name "
                             "already in the local Hugging Face cache, read offline (default: bundled)")
    _add_single_file_args(parser)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=(*DTYPES, "auto"),
                        help="model dtype; auto = bfloat16 for an SD-size model on a CPU with native bfloat16, "
                             "else float32 (default: auto)")
    parser.add_argument("--max-pixels", type=int, default=None, help="largest accepted width×height (default 1048576)")
    parser.add_argument("--runtime", default="eager", choices=runtime_names(),
                        help="UNet backend: " + "; ".join(backend_spec(name).help_line() for name in runtime_names())
                             + " (default: eager)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="also show gnr-fast's info log and the third-party notes it hides (gnr_fast.quiet)")


def _add_consistency_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "consistency models", "few-step editing (docs/consistency-models.md): the three files, when --model's "
        "gnr_fast.json does not name them (the sampler follows the model: these files select 'consistency')")
    group.add_argument("--teacher-unet", default=None, metavar="FILE", help="guidance-distilled UNet state dict (.pt)")
    group.add_argument("--reverse-lora", default=None, metavar="FILE", help="reverse consistency LoRA (.safetensors)")
    group.add_argument("--forward-lora", default=None, metavar="FILE", help="forward consistency LoRA (.safetensors)")
    _add_sampler_arg(group)


def _add_sampler_arg(parser) -> None:
    parser.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                        help="'consistency': the 4-step edit of a model that offers consistency files (the bundled "
                             "model does; its own consistency preset); default: the model's (DDIM, 50 steps, for the "
                             "bundled model)")


def _add_demo_model_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    _add_sampler_arg(parser)


def _add_single_file_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                        help="what the UNet predicts (default: detected; SD 1.x epsilon, SD 2.x guessed, see README)")
    parser.add_argument("--model-config", default=None, metavar="DIR",
                        help="diffusers component configs for a single file of another architecture")


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="gnr-fast", description="Guide-and-Rescale real-image editing")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit an image toward a target prompt")
    edit.add_argument("image", nargs="?", help="input image (PNG/JPEG/WebP); omit when --inversion is given")
    edit.add_argument("-s", "--source", help="prompt describing the input image")
    edit.add_argument("-t", "--target", required=True, help="prompt describing the edited image")
    edit.add_argument("-o", "--out", default=None, help="output image path (default: <image>_edited.png)")
    edit.add_argument("--preset", default=None, choices=ALL_PRESET_NAMES,
                      help="guidance preset (default: the model's, from its gnr_fast.json: 'shapes' for the "
                           "bundled model, 'consistency' for a consistency model, else 'nonstyle')")
    edit.add_argument("--config", default=None, help="edit config in the authors' YAML format (overrides --preset)")
    edit.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50, or the inversion's)")
    edit.add_argument("--inversion", default=None, help="reuse an inversion file written by `gnr-fast invert`")
    edit.add_argument("--mode", default=None, help="execution mode (default: the library's default)")
    _add_model_args(edit)
    _add_consistency_args(edit)

    inv = sub.add_parser("invert", help="DDIM-invert an image once, for repeated edits")
    inv.add_argument("image", help="input image (PNG/JPEG/WebP)")
    inv.add_argument("-s", "--source", required=True, help="prompt describing the input image")
    inv.add_argument("-o", "--out", required=True, help="output inversion file (e.g. photo.inv)")
    inv.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; a consistency model: its 4)")
    _add_model_args(inv)
    _add_serving_parsers(sub)
    demo.add_parser(sub, _add_demo_model_args)
    convert = sub.add_parser("convert", help="convert a single-file checkpoint to a diffusers folder (parsed once)")
    convert.add_argument("model_file", metavar="MODEL_FILE", help="single-file SD 1.x/2.x .safetensors/.ckpt")
    convert.add_argument("--out", required=True, metavar="DIR", help="diffusers pipeline folder to write")
    _add_single_file_args(convert)
    convert.add_argument("--dtype", default=None, choices=DTYPES, help="weights dtype (default: the file's)")
    convert.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    sub.add_parser("eval", help="edit-quality benchmark on the shapes world (gnr-fast eval --help)", add_help=False)
    return parser


# --- serving (issue 5): serve, client edit, export triton-repo ---------------------------------


def _add_serving_parsers(sub) -> None:
    from .serving.triton_repo import repository_runtimes

    serve = sub.add_parser("serve", help="serve gnr_edit and gnr_invert on Triton Inference Server")
    serve.add_argument("--host", default="127.0.0.1", help="address every endpoint binds to (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port (default 8001)")
    serve.add_argument("--metrics-port", type=int, default=8002, help="Triton Prometheus metrics port (default 8002)")
    serve.add_argument("--service-metrics-port", type=int, default=8003,
                       help="the edit service's Prometheus metrics (cache, batches, phases) port; 0: off (default 8003)")
    serve.add_argument("--max-batch", type=int, default=4, help="most concurrent edits sharing UNet calls (default 4)")
    serve.add_argument("--max-queue-delay-ms", type=float, default=20.0,
                       help="longest wait for more edits after the first of a batch (default 20)")
    serve.add_argument("--cache-mb", type=float, default=1024.0,
                       help="inversion cache budget in MiB, trajectories + source-pass internals (default 1024)")
    serve.add_argument("--steps", type=int, default=50, help="steps of requests that name none on a DDIM model (default 50; a consistency model uses its own 4)")
    serve.add_argument("--max-steps", type=int, default=200, help="refuse requests with more steps (default 200)")
    serve.add_argument("--exit-timeout", type=int, default=30,
                       help="seconds SIGTERM waits for requests in flight (default 30)")
    serve.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads of the edits (default: torch's)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting beyond the running ones; one more is refused as busy at once (default 64)")
    serve.add_argument("--max-image-mb", type=float, default=32.0, help="largest encoded image of a request (default 32)")
    serve.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds a request may wait; a queued one is then refused without running (default 600)")
    _add_model_args(serve)
    _add_sampler_arg(serve)

    client = sub.add_parser("client", help="call a gnr-fast Triton server")
    client_sub = client.add_subparsers(dest="client_command", required=True)
    cedit = client_sub.add_parser("edit", help="edit an image on a server")
    cedit.add_argument("image", help="input image (PNG/JPEG)")
    cedit.add_argument("-s", "--source", required=True, help="prompt describing the input image")
    cedit.add_argument("-t", "--target", required=True, help="prompt describing the edited image")
    cedit.add_argument("-o", "--out", default=None, help="output image path (default: <image>_edited.png)")
    cedit.add_argument("--url", default="127.0.0.1:8000", help="server address, http://host:port or grpc://host:port")
    cedit.add_argument("--wait-ready", type=float, default=30.0, metavar="S",
                       help="wait up to S seconds for the server to load gnr_edit before sending (default 30; 0: no wait)")
    cedit.add_argument("--preset", default=None, choices=PRESET_NAMES, help="guidance preset")
    cedit.add_argument("--config", default=None, help="edit config in the authors' YAML/JSON format")
    cedit.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the server's)")
    cedit.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer (default 600)")
    cedit.add_argument("--affinity", action="store_true",
                       help="send the image's route key so a balancer sends repeat edits to the replica caching it")
    cedit.add_argument("--retries", type=int, default=0,
                       help="re-send a request refused as busy / shutting down or left unanswered up to N times (default 0)")
    cedit.add_argument("--failover", nargs="*", default=[], metavar="URL",
                       help="other replicas' addresses that retries go to in turn (default: none; retry through --url)")

    doctor = sub.add_parser("doctor", help="which runtime backends and kernels work here, and why not")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    export = sub.add_parser("export", help="write deployment artifacts")
    export_sub = export.add_subparsers(dest="export_command", required=True)
    repo = export_sub.add_parser("triton-repo", help="a model repository for a standalone tritonserver")
    repo.add_argument("--model", default=None, help="local diffusers SD 1.x/2.x folder (default: the bundled model)")
    repo.add_argument("--out", required=True, help="repository folder to write")
    repo.add_argument("--device", default="cpu", help="torch device the server runs on (default: cpu)")
    repo.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default: float32)")
    repo.add_argument("--max-batch", type=int, default=4, help="Triton max_batch_size (default 4)")
    repo.add_argument("--max-queue-delay-ms", type=float, default=20.0, help="dynamic batching delay (default 20)")
    repo.add_argument("--instances", type=int, default=1, help="model instances (processes) (default 1)")
    repo.add_argument("--cache-mb", type=float, default=1024.0, help="inversion cache per instance, MiB (default 1024)")
    repo.add_argument("--steps", type=int, default=50, help="steps of requests that name none on a DDIM model (default 50; a consistency model uses its own 4)")
    repo.add_argument("--max-steps", type=int, default=200, help="refuse requests with more steps (default 200)")
    repo.add_argument("--max-pixels", type=int, default=None, help="largest accepted width×height (default 1048576)")
    repo.add_argument("--torch-threads", type=int, default=None, help="torch threads per instance (default: torch's)")
    repo.add_argument("--force", action="store_true", help="overwrite an existing repository folder")
    repo.add_argument("--runtime", default="eager", choices=repository_runtimes(),
                      help="backend of plain UNet calls; onnx exports the UNet into the repository (default eager)")
    _add_sampler_arg(repo)
    _add_export_engine_parsers(export_sub)


# --- exported UNets (issue 14): export onnx, export tensorrt ------------------------------------


def _add_export_engine_parsers(export_sub) -> None:
    onnx = export_sub.add_parser("onnx", help="the UNet as ONNX, for plain calls on ONNX Runtime or TensorRT")
    onnx.add_argument("--model", default=None, help="local diffusers SD 1.x/2.x folder (default: the bundled model)")
    onnx.add_argument("--out", required=True, help="export folder to write (unet.onnx, export.json)")
    onnx.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="export precision (default float32)")
    onnx.add_argument("--height", type=int, action="append", help="image height the export serves; repeat with --width for more sizes (default 512)")
    onnx.add_argument("--width", type=int, action="append", help="image width, paired with --height in order (default 512)")
    onnx.add_argument("--min-batch", type=int, default=1, help="fewest rows per call (default 1)")
    onnx.add_argument("--max-batch", type=int, default=4, help="most rows per call (default 4)")
    onnx.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"), help="torch.onnx exporter (default torchscript: 10x faster here)")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset, at least 18 (default 18)")
    onnx.add_argument("--force", action="store_true", help="replace an existing export in --out")

    trt = export_sub.add_parser("tensorrt", help="a TensorRT engine from an ONNX export (NVIDIA hosts)")
    trt.add_argument("--onnx", required=True, help="folder written by `gnr-fast export onnx`")
    trt.add_argument("--out", required=True, help="engine file to write (its record goes to ENGINE.json)")
    trt.add_argument("--fp16", action="store_true", help="let TensorRT run layers in float16")
    trt.add_argument("--preset", default=None, help="plan the profiles for this preset only (default: every preset)")
    trt.add_argument("--steps", type=int, default=50, help="DDIM steps the plans are made for (default 50)")
    trt.add_argument("--timing-cache", default=None, help="timing cache file to read and update (default ENGINE.timing)")
    trt.add_argument("--workspace-mb", type=int, default=4096, help="builder workspace limit in MiB (default 4096)")


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .runtime.onnx.export import export_onnx

    heights, widths = args.height or [512], args.width or [512]
    if (args.height is None) != (args.width is None) or len(heights) != len(widths):
        raise InputError(f"give --height and --width in pairs; got {len(heights)} heights and {len(widths)} widths")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise InputError(f"--out {args.out!r} exists and is not empty; choose another folder or pass --force")
    info = export_onnx(
        args.model, out, dtype=args.dtype, sizes=tuple(zip(heights, widths)), batch=(args.min_batch, args.max_batch),
        exporter=args.exporter, opset=args.opset,
    )
    sizes = ", ".join(f"{h * 8}x{w * 8}" for h, w in info.latent_sizes)
    print(f"wrote {out / info.onnx_file} (model {info.model_id}, {info.dtype}, {sizes}, batch {info.min_batch}-{info.max_batch})")
    return 0


def _cmd_export_tensorrt(args: argparse.Namespace) -> int:
    from .runtime.tensorrt.engine import build_engine, profiles_for_presets, require_tensorrt

    require_tensorrt("gnr-fast export tensorrt")  # before reading the export: the usual missing piece
    engine = build_engine(
        args.onnx, args.out, fp16=args.fp16, profiles=profiles_for_presets(args.onnx, args.preset, args.steps),
        timing_cache=args.timing_cache, workspace_mb=args.workspace_mb,
    )
    print(f"wrote {engine.path} ({len(engine.profiles)} optimisation profiles, fp16={engine.fp16})")
    return 0


def _quiet_library_progress() -> None:
    """The CLI shows its own progress; silence the per-tensor loading bars of transformers/diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _editor(args: argparse.Namespace, **options):
    """The editor the command's model arguments describe (``options``: further ``from_pretrained``
    keywords of one command)."""
    import torch

    from .editor import Editor
    from .images import DEFAULT_MAX_PIXELS

    consistency_files = {name: getattr(args, name, None) for name in ("teacher_unet", "reverse_lora", "forward_lora")}
    return Editor.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype),
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        runtime=args.runtime,
        prediction_type=args.prediction_type,
        config=args.model_config,
        sampler=getattr(args, "sampler", None),
        **consistency_files,
        **options,
    )


def _check_before_loading(args: argparse.Namespace) -> None:
    """Fail fast on user mistakes the model is not needed for (missing files, empty prompts)."""
    from .errors import InputError
    from .prompts import check_prompt

    for name in ("image", "inversion", "config"):
        value = getattr(args, name, None)
        if value is not None and not Path(value).is_file():
            raise InputError(f"{name} file {value!r} does not exist")
    if getattr(args, "target", None) is not None:
        check_prompt(args.target, "target_prompt")
    if args.source is not None:
        check_prompt(args.source, "source_prompt")


def _cmd_edit(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .inversion import Inversion

    if args.inversion is None and args.image is None:
        raise InputError("give an IMAGE to edit, or --inversion FILE from `gnr-fast invert`")
    if args.inversion is None and not args.source:
        raise InputError("-s/--source (a prompt describing the input image) is required when editing an image")
    _check_before_loading(args)
    out = check_writable_file(_edit_output(args), "-o/--out")
    source = Inversion.load(args.inversion, device=args.device) if args.inversion else args.image
    editor = _editor(args)
    kwargs = {"mode": args.mode} if args.mode else {}
    result = editor.edit(
        source,
        args.target,
        source_prompt=args.source,
        preset=args.preset,
        config=args.config,
        num_steps=args.steps,
        progress=not args.quiet,
        **kwargs,
    )
    result.image.save(out)
    t = result.timings
    print(
        f"wrote {out} ({result.image.width}x{result.image.height}) in {t.total_s:.1f}s "
        f"[inversion {t.inversion_s:.1f}s, editing {t.editing_s:.1f}s, decoding {t.decoding_s:.1f}s, "
        f"{result.unet_calls} UNet calls]"
    )
    return 0


def _edit_output(args: argparse.Namespace) -> Path:
    """-o/--out, else <image>_edited.png, else <inversion>.edited.png."""
    if args.out is not None:
        return Path(args.out)
    if args.image is not None:
        return Path(args.image).with_name(Path(args.image).stem + "_edited.png")
    return Path(args.inversion).with_suffix(".edited.png")


def _cmd_invert(args: argparse.Namespace) -> int:
    import time

    _check_before_loading(args)
    check_writable_file(args.out, "-o/--out")
    editor = _editor(args)
    start = time.perf_counter()
    inversion = editor.invert(args.image, args.source, num_steps=args.steps, progress=not args.quiet)
    path = inversion.save(args.out)
    print(f"wrote {path} ({inversion.num_steps} steps, model {inversion.model_id}) in {time.perf_counter() - start:.1f}s")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from .serving.launcher import require_pytriton
    from .serving.server import ServerConfig, check_addresses, serve
    from .serving.service import ServiceConfig

    require_pytriton()
    service_config = ServiceConfig(
        max_batch=args.max_batch,
        max_queue_delay_ms=args.max_queue_delay_ms,
        cache_mb=args.cache_mb,
        default_steps=args.steps,
        max_steps=args.max_steps,
        torch_threads=args.torch_threads if args.torch_threads is not None else torch.get_num_threads(),
        max_queue=args.max_queue,
        max_image_bytes=max(1, int(args.max_image_mb * 1024**2)),
        request_timeout_s=args.request_timeout,
    )
    server_config = ServerConfig(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        service_metrics_port=args.service_metrics_port or None,
        exit_timeout_s=args.exit_timeout,
    )
    check_addresses(server_config)  # before loading the model: a taken port fails at once
    # Every edit runs on the service's engine thread, with service_config.torch_threads. This thread
    # only loads the model and must not own an OpenMP team of its own: with two teams libgomp
    # counts more threads than cores and stops spinning between parallel regions, which made edits
    # about 2.5x slower on 2 cores (benchmarks/README_server.md, "Torch threads in the server").
    torch.set_num_threads(1)
    editor = _editor(args, source_cache_mb=args.cache_mb)

    def ready(config: ServerConfig) -> None:
        print(
            f"serving gnr_edit, gnr_invert (model {editor.model_id}): http {config.host}:{config.http_port}, "
            f"grpc {config.host}:{config.grpc_port}, metrics {config.host}:{config.metrics_port}"
            + (f", service metrics {config.host}:{config.service_metrics_port}" if config.service_metrics_port else "")
            + "; "
            "SIGTERM or Ctrl+C stops",
            flush=True,
        )

    if not serve(editor, service_config, server_config, on_ready=ready):
        print("gnr-fast: error: Triton Inference Server stopped unexpectedly; see its log above", file=sys.stderr)
        return 1
    print("server stopped", flush=True)
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    import json

    import yaml

    from .client import GnrClient
    from .errors import ConfigError, InputError

    if not Path(args.image).is_file():
        raise InputError(f"image file {args.image!r} does not exist")
    config = None
    if args.config is not None:
        if not Path(args.config).is_file():
            raise InputError(f"config file {args.config!r} does not exist")
        try:
            config = yaml.safe_load(Path(args.config).read_text())  # YAML is a superset of JSON
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(
                f"config {args.config!r} is not valid YAML/JSON: {getattr(exc, 'problem', None) or exc}{where}"
            ) from exc
        config = json.dumps(config)
    out = check_writable_file(
        Path(args.out) if args.out else Path(args.image).with_name(Path(args.image).stem + "_edited.png"), "-o/--out"
    )
    with GnrClient(args.url, timeout_s=args.timeout, affinity=args.affinity, retries=args.retries,
                   failover=args.failover) as client:
        if args.wait_ready > 0:
            client.wait_ready(args.wait_ready)
        image, info = client.edit(args.image, args.source, args.target, preset=args.preset, config=config, steps=args.steps)
    image.save(out)
    t = info.get("timings", {})
    print(
        f"wrote {out} ({image.width}x{image.height}) in {t.get('total_s', 0):.1f}s on the server "
        f"[cache {'hit' if info.get('cache_hit') else 'miss'}, inversion {t.get('inversion_s', 0):.1f}s, "
        f"editing {t.get('editing_s', 0):.1f}s, batch of {info.get('batch_size', 1)}]"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.export_command == "onnx":
        return _cmd_export_onnx(args)
    if args.export_command == "tensorrt":
        return _cmd_export_tensorrt(args)
    from .serving.triton_repo import RepoConfig, write_repository

    config = RepoConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch=args.max_batch,
        max_queue_delay_ms=args.max_queue_delay_ms,
        instances=args.instances,
        cache_mb=args.cache_mb,
        default_steps=args.steps,
        max_steps=args.max_steps,
        max_pixels=args.max_pixels,
        torch_threads=args.torch_threads,
        runtime=args.runtime,
        sampler=args.sampler,
    )
    out = write_repository(config, args.out, overwrite=args.force)
    print(f"wrote a Triton model repository to {out}; run it with:\n  tritonserver --model-repository={out}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import format_report, report_json, run_checks

    checks = run_checks()
    print(report_json(checks) if args.json else format_report(checks))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .checkpoints import convert_single_file

    out = convert_single_file(
        args.model_file,
        args.out,
        prediction_type=args.prediction_type,
        config=args.model_config,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        overwrite=args.force,
    )
    print(f"wrote diffusers pipeline folder {out}; use it with --model {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    check_writable_file(args.out, "-o/--out")
    return demo.run(args, _editor(args))


COMMANDS = {
    "convert": _cmd_convert,
    "demo": _cmd_demo,
    "edit": _cmd_edit,
    "invert": _cmd_invert,
    "serve": _cmd_serve,
    "client": _cmd_client,
    "export": _cmd_export,
    "doctor": _cmd_doctor,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gnr-fast`` console script; returns the exit code."""
    from safetensors import SafetensorError

    from .quiet import show_third_party_noise

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv) if argv[:1] != ["eval"] else None  # eval parses its own
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "verbose", False):
        logging.getLogger("gnr_fast").setLevel(logging.INFO)
        show_third_party_noise()
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        if argv[:1] == ["eval"]:
            return _run_eval(argv[1:])
        _quiet_library_progress()
        return COMMANDS[args.command](args)
    except GnrError as exc:
        print(f"gnr-fast: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as exc:  # file-system failures the checks above could not foresee
        print(f"gnr-fast: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gnr-fast: interrupted", file=sys.stderr)
        return 130


EVAL_PACKAGE = "gnr_shapes"
EVAL_MODULE = f"{EVAL_PACKAGE}.evaluation.quality"
"""Where ``gnr-fast eval`` lives: the bundled model's quality evaluation, outside the engine."""


def _run_eval(argv: list[str]) -> int:
    """``gnr-fast eval``: the evaluation package's ``main``, imported only now (the engine does not
    depend on it); a :class:`ConfigError` when that package is not installed."""
    if importlib.util.find_spec(EVAL_PACKAGE) is None:
        raise ConfigError(f"'gnr-fast eval' needs the {EVAL_PACKAGE} package, which is not installed (it ships "
                          "in the gnr-fast repository: 'pip install -e .' in a checkout installs it)")
    return importlib.import_module(EVAL_MODULE).main(argv)


def _one_line(exc: BaseException) -> str:
    """An error as one line: '<reason>: <path>' for a plain OSError, else its message with line breaks folded."""
    if isinstance(exc, OSError) and not isinstance(exc, GnrError) and exc.strerror:
        paths = [p for p in (exc.filename, exc.filename2) if p is not None]
        return f"{exc.strerror}: {' -> '.join(map(str, paths))}" if paths else exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
