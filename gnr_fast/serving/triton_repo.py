"""``gnr-fast export triton-repo``: a model repository for a standalone ``tritonserver``.

The repository holds one model, ``gnr_edit`` (the tensors of :mod:`gnr_fast.serving.protocol`,
with a batch dimension), run by Triton's Python backend:

    OUT/gnr_edit/config.pbtxt     max_batch_size, dynamic_batching, instance_group, parameters
    OUT/gnr_edit/1/model.py       imports :class:`TritonPythonModel` from this module

Triton's dynamic batcher gathers up to ``max_batch`` requests within ``max_queue_delay_ms``; one
``execute`` call validates each request, answers the bad ones with their own error, and runs the
valid ones through :meth:`EditService.run <gnr_fast.serving.service.EditService.run>` (shared UNet
calls, inversion cache). Each instance is a separate process with its own model copy and cache,
so ``gnr_invert`` (which only fills a cache) is served by ``gnr-fast serve`` alone.

The Python backend imports ``gnr_fast`` from the Python environment whose ``bin`` is first on the
server's ``PATH``, and must load that interpreter's ``libpython`` (see
:mod:`gnr_fast.serving.launcher`, whose :func:`~gnr_fast.serving.launcher.tritonserver_command`
starts the ``tritonserver`` bundled in the pytriton wheel on such a repository).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, ExportError, GnrError
from ..model_defaults import SAMPLER_NAMES
from ..runtime.calls import CallKind
from ..runtime.registry import backend_names, backend_spec
from .protocol import EDIT_INPUTS, EDIT_MODEL, EDIT_OUTPUTS, Field, bytes_tensor, error_line, read_inputs

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
ONNX_FOLDER = "unet-onnx"  # OUT/gnr_edit/1/unet-onnx: the UNet for plain calls (runtime "onnx")
ONNX_FORWARD_FOLDER = "unet-onnx-forward"  # a consistency model's forward (inversion) UNet, beside it
ONNX_CACHE_FOLDER = "unet-onnx-cache"  # lazy exports of working sizes the repository's export lacks


def repository_runtimes() -> tuple[str, ...]:
    """The runtime presets a repository can run (from :mod:`gnr_fast.runtime.registry`): every
    backend serving plain calls that runs the PyTorch UNet or an ONNX export (which the repository
    holds); a TensorRT engine is built for one GPU, on the serving host, so it is not written here."""
    return tuple(name for name in backend_names(CallKind.PLAIN) if backend_spec(name).export in (None, "onnx"))


MODEL_PY = '''"""gnr-fast edit model for Triton's Python backend (written by `gnr-fast export triton-repo`)."""

from gnr_fast.serving.triton_repo import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class RepoConfig:
    """What the exported ``gnr_edit`` model runs and how Triton schedules it."""

    model: str | None = None  # local diffusers folder; None: the bundled model
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 4  # Triton max_batch_size: most requests in one execute (they share UNet calls)
    max_queue_delay_ms: float = 20.0  # dynamic batching: longest wait for more requests
    instances: int = 1  # instance_group count (processes, each with its own model and cache)
    cache_mb: float = 1024.0  # inversion cache per instance
    default_steps: int = 50
    max_steps: int = 200
    max_pixels: int | None = None
    torch_threads: int | None = None
    runtime: str = "eager"  # "onnx": plain calls on ONNX Runtime, the UNet exported into the repository
    sampler: str | None = None  # "consistency": the model's 4-step edit (None: the model's own sampler)

    def __post_init__(self) -> None:
        if self.sampler is not None and self.sampler not in SAMPLER_NAMES:
            raise ConfigError(f"sampler must be one of {SAMPLER_NAMES}, got {self.sampler!r}")
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.runtime not in repository_runtimes():
            raise ConfigError(f"runtime must be one of {repository_runtimes()}, got {self.runtime!r}")
        for name in ("max_batch", "instances", "default_steps", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_queue_delay_ms", "cache_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("max_pixels", "torch_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def write_repository(config: RepoConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Write the ``gnr_edit`` repository to ``out``; return its absolute path.

    The model folder is resolved to an absolute path and checked to be a diffusers pipeline;
    ``out`` must not exist unless ``overwrite``.
    """
    out = Path(out).resolve()
    model = config.model
    if model is not None:
        path = Path(model).resolve()
        if not (path / "model_index.json").is_file():
            raise ExportError(f"--model {model!r} is not a diffusers pipeline folder (no model_index.json in {path})")
        model = str(path)
    if out.exists():
        if not overwrite:
            raise ExportError(f"{str(out)!r} exists; choose another --out or pass --force to overwrite it")
        if not (out / EDIT_MODEL / "config.pbtxt").is_file() and any(out.iterdir()):
            raise ExportError(f"{str(out)!r} is not empty and not a gnr-fast repository; refusing to overwrite it")
        shutil.rmtree(out)
    version = out / EDIT_MODEL / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(MODEL_PY)
    if config.runtime == "onnx":
        _export_unet(config, model, version / ONNX_FOLDER)
    (out / EDIT_MODEL / "config.pbtxt").write_text(model_config(RepoConfig(**{**asdict(config), "model": model})))
    return out


def _export_unet(config: RepoConfig, model: str | None, folder: Path) -> None:
    """The UNet(s) the instances will run, as ONNX at the model's native working size, batch up to
    2 plain rows per edit of a dynamic batch (other sizes are exported lazily on first use into
    ``ONNX_CACHE_FOLDER``): a consistency model's reverse UNet into ``folder`` and its forward UNet
    into :data:`ONNX_FORWARD_FOLDER` beside it, both with their LoRAs fused as the editor fuses them."""
    import torch

    from ..editor import Editor
    from ..runtime.onnx.export import export_unet_onnx

    editor = Editor.from_pretrained(model, dtype=torch.float32, sampler=config.sampler)
    components = editor.components
    side = components.unet.config.sample_size
    onnx_dtype = "float16" if config.dtype == "float16" else "float32"
    unets = {folder: components.unet}
    if editor.inversion_unet is not components.unet:
        unets[folder.with_name(ONNX_FORWARD_FOLDER)] = editor.inversion_unet
    for out, unet in unets.items():
        export_unet_onnx(unet, out, dtype=onnx_dtype, latent_sizes=((side, side),), batch=(1, min(64, 2 * config.max_batch)),
                         model_id=components.model_id)


def model_config(config: RepoConfig) -> str:
    """The ``config.pbtxt`` of ``gnr_edit`` (Triton's protobuf text format)."""

    def tensor(spec: Field) -> str:
        kind = "TYPE_STRING" if spec.datatype == "BYTES" else "TYPE_INT32"
        optional = " optional: true" if spec.optional else ""
        return f'  {{ name: "{spec.name}" data_type: {kind} dims: [ 1 ]{optional} }}'

    parameters = {
        "model_path": config.model or "",
        "device": config.device,
        "dtype": config.dtype,
        "cache_mb": str(config.cache_mb),
        "default_steps": str(config.default_steps),
        "max_steps": str(config.max_steps),
        "max_pixels": "" if config.max_pixels is None else str(config.max_pixels),
        "torch_threads": "" if config.torch_threads is None else str(config.torch_threads),
        "runtime": config.runtime,
        "sampler": config.sampler or "",
    }
    lines = [
        f'name: "{EDIT_MODEL}"',
        'backend: "python"',
        f"max_batch_size: {config.max_batch}",
        "input [",
        ",\n".join(tensor(f) for f in EDIT_INPUTS),
        "]",
        "output [",
        ",\n".join(tensor(f) for f in EDIT_OUTPUTS),
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {int(round(config.max_queue_delay_ms * 1000))}",
        "}",
        f"instance_group [ {instance_group(config)} ]",
        "parameters [",
        ",\n".join(f"  {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}" for k, v in parameters.items()),
        "]",
        "",
    ]
    return "\n".join(lines)


def instance_group(config: RepoConfig) -> str:
    """The ``instance_group`` entry: ``KIND_GPU`` on the configured GPU (all GPUs for plain ``cuda``,
    ``count`` instances on each) when the device is CUDA, else ``KIND_CPU``."""
    if config.device.startswith("cuda"):
        index = config.device.partition(":")[2]
        gpus = f" gpus: [ {int(index)} ]" if index else ""
        return f"{{ count: {config.instances} kind: KIND_GPU{gpus} }}"
    return f"{{ count: {config.instances} kind: KIND_CPU }}"


def instance_device(device: str, args: dict) -> str:
    """The device one model instance loads onto: ``cuda:<id>`` of the GPU Triton placed a
    ``KIND_GPU`` instance on (``args["model_instance_device_id"]``), else the configured ``device``."""
    if args.get("model_instance_kind") == "GPU" and device.startswith("cuda"):
        return f"cuda:{int(args['model_instance_device_id'])}"
    return device


class TritonPythonModel:
    """The Python-backend model of ``gnr_edit`` (Triton calls initialize / execute / finalize)."""

    def initialize(self, args: dict) -> None:
        import torch

        from ..editor import Editor
        from ..images import DEFAULT_MAX_PIXELS
        from .service import EditService, ServiceConfig

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if params.get("torch_threads"):
            torch.set_num_threads(int(params["torch_threads"]))
        cache_mb = float(params.get("cache_mb") or 1024)
        editor = Editor.from_pretrained(
            params.get("model_path") or None,
            device=instance_device(params.get("device") or "cpu", args),
            dtype=getattr(torch, params.get("dtype") or "float32"),
            max_pixels=int(params["max_pixels"]) if params.get("max_pixels") else DEFAULT_MAX_PIXELS,
            source_cache_mb=cache_mb,
            sampler=params.get("sampler") or None,
            **_runtime_kwargs(params.get("runtime") or "eager", args),
        )
        self.service = EditService(
            editor,
            ServiceConfig(
                max_batch=int(config.get("max_batch_size") or 1),
                cache_mb=cache_mb,
                default_steps=int(params.get("default_steps") or 50),
                max_steps=int(params.get("max_steps") or 200),
            ),
        )
        logger.info("gnr_edit instance %s ready (model %s)", args.get("model_instance_name"), editor.model_id)

    def execute(self, requests: list) -> list:
        """One response per request: validation errors and failed edits are that request's error."""
        import triton_python_backend_utils as pb_utils

        from .service import encode_png

        jobs, answers = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                values = read_inputs(_request_data(pb_utils, request), EDIT_INPUTS)
                jobs.append((i, self.service.edit_job(
                    values["image"], values["source_prompt"], values["target_prompt"],
                    preset=values["preset"], config_json=values["config"], steps=values["steps"],
                )))
            except GnrError as exc:
                answers[i] = exc
        for (i, job), outcome in zip(jobs, self.service.run([job for _, job in jobs]) if jobs else []):
            answers[i] = outcome if isinstance(outcome, GnrError) else (job, outcome)
        responses = []
        for answer in answers:
            if isinstance(answer, GnrError):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(error_line(answer))))
                continue
            job, outcome = answer
            png = encode_png(outcome.result.image)
            info = json.dumps(outcome.info(job)).encode()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("edited_image", bytes_tensor(png, batched=True)),
                pb_utils.Tensor("info", bytes_tensor(info, batched=True)),
            ]))
        return responses

    def finalize(self) -> None:
        self.service.cache.clear()


def _runtime_kwargs(runtime: str, args: dict) -> dict:
    """The ``runtime=`` argument of the editor of an instance: none for eager (the default), the
    preset name for compiled, and for onnx the repository's export plus a lazy-export cache beside it."""
    if runtime == "eager":
        return {}
    if runtime != "onnx":
        return {"runtime": runtime}
    from dataclasses import replace

    from ..runtime.config import RuntimeConfig

    version = Path(args["model_repository"]) / str(args.get("model_version") or "1")
    exports = tuple(version / name for name in (ONNX_FOLDER, ONNX_FORWARD_FOLDER) if (version / name).is_dir())
    return {"runtime": replace(RuntimeConfig.resolve("onnx"), onnx_exports=exports,
                               export_cache_dir=version / ONNX_CACHE_FOLDER)}


def _request_data(pb_utils, request) -> dict:
    """The request's input tensors as numpy arrays (absent optional inputs left out)."""
    data = {}
    for spec in EDIT_INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            data[spec.name] = tensor.as_numpy()
    return data
