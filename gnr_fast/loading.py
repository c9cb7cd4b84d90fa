"""Checkpoint → components: load a local diffusers Stable Diffusion 1.x/2.x folder, fully offline."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import (
    ConfigError,
    MissingComponentError,
    ModelLoadError,
    ModelNotFoundError,
    NotAPipelineError,
    UnsupportedArchitectureError,
)
from .fingerprint import config_bytes, model_fingerprint
from .hub import resolve_model
from .model_defaults import METADATA_NAME, load_model_defaults
from .model_files import BUNDLED_MODEL, read_json
from .precision import MODEL_DTYPES, ModelDtype, PrecisionPolicy, default_model_dtype
from .schedules import NoiseSchedule
from .quiet import third_party_noise_filtered

logger = logging.getLogger(__name__)

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "GuideAndRescalePipeline",  # gnr_fast.pipeline's save_pretrained
}
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}


@dataclass
class Components:
    """Everything an edit needs from a checkpoint, already on ``device`` in ``dtype``."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    schedule: NoiseSchedule
    path: Path
    model_id: str
    device: torch.device
    dtype: torch.dtype  # of the UNet and text encoder (the VAE's is ``vae.dtype``, see ``precision``)
    precision: PrecisionPolicy | None = None  # None: PrecisionPolicy(model_dtype=dtype)
    # The caption grammar's second encoder for relaxed prompts (gnr_fast.json, see
    # gnr_fast.prompts.text_encoder_for); None for a model with one.
    relaxed_text_encoder: Any | None = None

    def __post_init__(self) -> None:
        if self.precision is None:
            self.precision = PrecisionPolicy(model_dtype=self.dtype)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def check_pipeline_folder(path: Path) -> dict:
    """Validate the folder layout of a diffusers SD pipeline; return model_index.json.

    Raises a :class:`ModelLoadError` subclass naming the path and the fix for: a missing path, a file
    or folder that is not a diffusers pipeline, a missing component/config/weights, SDXL and other
    unsupported architectures.
    """
    if not path.exists() and path == BUNDLED_MODEL:
        raise ModelNotFoundError(
            f"the bundled model is not installed at {str(path)!r}; reinstall gnr-fast, or pass --model / path= with "
            "a local diffusers Stable Diffusion 1.x/2.x folder"
        )
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {str(path)!r} does not exist. Pass the folder of a local diffusers Stable Diffusion "
            "1.x/2.x checkpoint (the one holding model_index.json), or omit --model to use the bundled model."
        )
    if path.is_file():
        raise NotAPipelineError(
            f"model path {str(path)!r} is a file of an unknown kind ({path.suffix or 'no suffix'}). gnr-fast loads "
            "diffusers pipeline folders and single-file SD 1.x/2.x checkpoints named *.safetensors, *.ckpt, *.pt or "
            "*.pth; rename the file if it is one of those."
        )
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise NotAPipelineError(
            f"{str(path)!r} is not a diffusers pipeline folder: model_index.json is missing. Pass the folder that "
            "holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/."
        )
    index = read_json(index_path)
    class_name = str(index.get("_class_name", ""))
    if "XL" in class_name or "text_encoder_2" in index or "StableDiffusion3" in class_name or "Flux" in class_name:
        raise UnsupportedArchitectureError(
            f"{str(path)!r} holds a {class_name or 'non-SD'} checkpoint; gnr-fast supports Stable Diffusion 1.x and "
            "2.x (UNet2DConditionModel with one CLIP text encoder). Use an SD 1.x/2.x checkpoint."
        )
    if class_name not in SUPPORTED_PIPELINES:
        raise UnsupportedArchitectureError(
            f"{str(path)!r} holds a {class_name!r} pipeline; supported: {sorted(SUPPORTED_PIPELINES)}."
        )
    for component, config_name in _CONFIG_FILES.items():
        folder = path / component
        if not (folder / config_name).is_file():
            raise MissingComponentError(
                f"{str(path)!r}: component '{component}' is missing ({folder / config_name} not found). "
                "The checkpoint folder is incomplete; re-export it with save_pretrained()."
            )
        weights = _WEIGHT_FILES.get(component)
        if weights and not any((folder / w).is_file() for w in weights):
            raise MissingComponentError(
                f"{str(path)!r}: weights of '{component}' are missing (expected {folder / weights[0]}). "
                "The checkpoint folder is incomplete; re-export it with save_pretrained()."
            )
    unet_config = read_json(path / "unet" / "config.json")
    if unet_config.get("addition_embed_type") is not None or unet_config.get("_class_name") != "UNet2DConditionModel":
        raise UnsupportedArchitectureError(
            f"{str(path)!r}: UNet {unet_config.get('_class_name')} with addition_embed_type="
            f"{unet_config.get('addition_embed_type')!r} is not an SD 1.x/2.x UNet (SDXL-style conditioning is "
            "not supported). Use an SD 1.x/2.x checkpoint."
        )
    return index


PROBES: dict[str, tuple[str, ...]] = {
    "unet": ("conv_in.weight", "conv_out.weight"),
    "vae": ("encoder.conv_in.weight", "decoder.conv_out.weight"),
    "text_encoder": ("embeddings.token_embedding.weight",),
}
"""Weights hashed into the model id, by component (matched as key suffixes in the weight files)."""
PROBE_EMBEDDING_ROWS = 64
"""Rows of the token-embedding table hashed (the whole table is 49408 × 768 in SD 1.x)."""


def module_probes(unet: Any, vae: Any, text_encoder: Any) -> list[torch.Tensor]:
    """The :data:`PROBES` tensors of loaded modules, as float32 on the CPU (in that order)."""
    tensors = [unet.conv_in.weight, unet.conv_out.weight, vae.encoder.conv_in.weight, vae.decoder.conv_out.weight]
    tensors.append(text_encoder.get_input_embeddings().weight[:PROBE_EMBEDDING_ROWS])
    return [t.detach().to("cpu", torch.float32) for t in tensors]


def stored_probes(path: Path) -> list[torch.Tensor] | None:
    """The :data:`PROBES` tensors as the pipeline folder's weight files store them, upcast to float32.

    Independent of the dtype the model is loaded in (a float16 load rounds the weights; the files do
    not change), so the model id of one checkpoint is the same in every dtype. ``None`` when a
    component's weights are not a safetensors file holding every probe (then the caller hashes the
    loaded modules' weights).
    """
    probes = []
    for component, names in PROBES.items():
        weights = path / component / _WEIGHT_FILES[component][0]
        if not weights.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
            for name in names:
                matches = [name] if name in keys else [k for k in keys if k.endswith("." + name)]
                if len(matches) != 1:
                    return None
                tensor = handle.get_slice(matches[0])
                tensor = tensor[:PROBE_EMBEDDING_ROWS] if name.startswith("embeddings.") else tensor[:]
                probes.append(tensor.to(torch.float32))
    return probes


_ALIGNMENT = 64  # bytes; torch's CPU allocator aligns every allocation to this


def _own_aligned_memory(module: Any) -> None:
    """Copy tensors that still point into a memory-mapped weights file at an unaligned offset.

    diffusers/transformers map safetensors files and leave tensors at the file's byte offsets. CPU
    matmul kernels round differently on unaligned memory (measured: 2.4e-7 on one of the tiny UNet's
    linear layers, 1.6e-5 relative on a 4-step edit), so without this copy an edit would depend on
    where each weight sat in its file — a folder and its single file would edit differently.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
            tensor.data = tensor.data.clone()


def _load_folder(path: Path, dtype: torch.dtype, precision: PrecisionPolicy) -> tuple[Any, Any, Any, Any, dict]:
    """UNet, VAE, text encoder, tokenizer and scheduler config of a checked pipeline folder (the VAE in
    ``precision.vae_dtype`` of its config's ``force_upcast``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae_config = read_json(path / "vae" / "config.json")
    vae_dtype = precision.vae_dtype(bool(vae_config.get("force_upcast", True)))
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    try:
        quiet = {"local_files_only": True, "low_cpu_mem_usage": False}
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, **quiet)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=vae_dtype, **quiet)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(
            f"loading {str(path)!r} failed: {exc}. Check that the folder is a complete diffusers SD 1.x/2.x export."
        ) from exc
    return unet, vae, text_encoder, tokenizer, scheduler_config


def _load_single_file(
    path: Path, dtype: torch.dtype, prediction_type: str | None, config: str | Path | None
) -> tuple[Any, Any, Any, Any, dict]:
    """UNet, VAE, text encoder, tokenizer and scheduler config of a single-file checkpoint."""
    from .checkpoints import load_single_file

    modules = load_single_file(path, dtype=dtype, prediction_type=prediction_type, config=config)
    return modules.unet, modules.vae, modules.text_encoder, modules.tokenizer, modules.scheduler_config


def load_components(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: ModelDtype = torch.float32,
    prediction_type: str | None = None,
    config: str | Path | None = None,
    precision: PrecisionPolicy | None = None,
) -> Components:
    """Load UNet, VAE, text encoder, tokenizer and noise schedule from a local pipeline folder or single file.

    Never contacts a hub (``local_files_only=True`` everywhere). ``path=None`` loads the bundled model;
    a hub id ``org/name`` that is not a local path is read from the local Hugging Face cache
    (:func:`gnr_fast.hub.resolve_hub_id`; :class:`ModelNotFoundError` saying where it looked).
    A ``.safetensors``/``.ckpt``/``.pt``/``.pth`` file is a single-file SD 1.x/2.x checkpoint
    (:func:`gnr_fast.checkpoints.load_single_file`: family detection, shipped configs).
    ``prediction_type`` ('epsilon' or 'v_prediction') overrides the detected or configured one;
    ``config`` is a folder of diffusers component configs for single files of another architecture.
    UNet and text encoder are loaded in ``dtype`` (``"auto"``: float32, or bfloat16 where
    :func:`gnr_fast.precision.default_model_dtype` says it pays off); the VAE in ``precision.vae_dtype(force_upcast)``
    (float32 for a low-precision ``dtype`` when the VAE config says ``force_upcast``, the default).
    ``precision`` defaults to ``PrecisionPolicy(model_dtype=dtype)``; if given, its model dtype
    must be ``dtype``.
    """
    from .checkpoints import check_prediction_type, is_single_file

    path = resolve_model(path) or BUNDLED_MODEL  # a hub id ('org/name') is read from the local hub cache
    check_prediction_type(prediction_type)
    single_file = is_single_file(path)
    if not single_file:
        check_pipeline_folder(path)
        if config is not None:
            raise ModelLoadError(
                f"config={str(config)!r} (--model-config) applies to single-file checkpoints only, but {str(path)!r} "
                "is a pipeline folder whose own configs are used; drop the option."
            )
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device={str(device)!r} requested but CUDA is not available here; use device='cpu'.")
    auto = isinstance(dtype, str) and dtype == "auto"
    if auto:
        # Loaded in float32, then cast where default_model_dtype says (it needs the UNet's config);
        # an explicit precision policy's model dtype wins.
        dtype = precision.model_dtype if precision is not None else torch.float32
        auto = precision is None
    if dtype not in MODEL_DTYPES:
        raise ModelLoadError(
            f"dtype={dtype} is not supported; use torch.float32, torch.float16, torch.bfloat16 or 'auto'."
        )
    if precision is None:
        precision = PrecisionPolicy(model_dtype=dtype)
    elif precision.model_dtype != dtype:
        raise ConfigError(
            f"precision.model_dtype={precision.model_dtype} differs from dtype={dtype}; pass one dtype for both"
        )

    relaxed_folder = relaxed_text_encoder = None
    if single_file:
        unet, vae, text_encoder, tokenizer, scheduler_config = _load_single_file(path, dtype, prediction_type, config)
    else:
        unet, vae, text_encoder, tokenizer, scheduler_config = _load_folder(path, dtype, precision)
        relaxed_folder = _relaxed_text_encoder_folder(path)
        if relaxed_folder is not None:
            relaxed_text_encoder = _load_relaxed_text_encoder(relaxed_folder, dtype)
    text_encoders = [text_encoder] + ([relaxed_text_encoder] if relaxed_text_encoder is not None else [])
    if auto:
        dtype = default_model_dtype(unet, device)
        if dtype != torch.float32:
            precision = PrecisionPolicy(model_dtype=dtype)
            unet.to(dtype=dtype)
            for encoder in text_encoders:
                encoder.to(dtype=dtype)
    # A no-op for a folder loaded in the policy's dtype; single files and "auto" casts land here.
    with third_party_noise_filtered():  # diffusers' note on any .to(dtype) of a VAE (gnr_fast.quiet)
        vae.to(dtype=precision.vae_dtype(bool(vae.config.get("force_upcast", True))))
    if prediction_type is not None:
        scheduler_config = {**scheduler_config, "prediction_type": prediction_type}
    schedule = noise_schedule(scheduler_config)
    if tokenizer.model_max_length > 1024:
        # Tokenizers rebuilt from vocab.json + merges.txt carry a huge sentinel length; CLIP's is 77.
        tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
        _own_aligned_memory(module)
    probes = None if single_file else stored_probes(path)
    if probes is None:
        if not single_file:
            logger.warning("%s: weights are not safetensors files holding %s; the model id hashes the loaded "
                           "weights, so it depends on dtype=%s", path, PROBES, dtype)
        probes = module_probes(unet, vae, text_encoder)
    model_id = model_fingerprint(unet, vae, text_encoder, schedule, probes)
    if relaxed_folder is not None:
        model_id = _with_relaxed_text_encoder(model_id, relaxed_folder)
    logger.info("loaded %s (model id %s) on %s/%s, VAE in %s", path, model_id, device, dtype, vae.dtype)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        schedule=schedule,
        path=path,
        model_id=model_id,
        device=device,
        dtype=dtype,
        precision=precision,
        relaxed_text_encoder=relaxed_text_encoder,
    )


def noise_schedule(scheduler_config: Any) -> NoiseSchedule:
    """The DDIM noise schedule of a diffusers scheduler config (a dict or a scheduler's ``config``;
    SD 1.x defaults for missing entries), whatever scheduler class the config belongs to."""
    return NoiseSchedule.from_betas(
        beta_start=scheduler_config.get("beta_start", 0.00085),
        beta_end=scheduler_config.get("beta_end", 0.012),
        num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        beta_schedule=scheduler_config.get("beta_schedule", "scaled_linear"),
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
    )


def _relaxed_text_encoder_folder(path: Path) -> Path | None:
    """The folder of the second text encoder the model's ``gnr_fast.json`` names for relaxed prompts
    (:class:`~gnr_fast.model_defaults.CaptionGrammar`), checked to hold a config and weights; None
    when it names none."""
    grammar = load_model_defaults(path).caption_grammar
    if grammar is None or grammar.relaxed_text_encoder is None:
        return None
    folder = path / grammar.relaxed_text_encoder
    config, weights = _CONFIG_FILES["text_encoder"], _WEIGHT_FILES["text_encoder"]
    if not (folder / config).is_file() or not any((folder / name).is_file() for name in weights):
        raise ModelLoadError(
            f"{path / METADATA_NAME} names the relaxed-prompt text encoder {grammar.relaxed_text_encoder!r}, but "
            f"{str(folder)!r} does not hold {config} and {' or '.join(weights)}; restore the "
            "folder or drop 'caption_grammar.relaxed_text_encoder'"
        )
    return folder


def _load_relaxed_text_encoder(folder: Path, dtype: torch.dtype) -> Any:
    """The CLIP text encoder in ``folder`` (see :func:`_relaxed_text_encoder_folder`), in ``dtype``."""
    from transformers import CLIPTextModel

    try:
        return CLIPTextModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"loading the relaxed-prompt text encoder {str(folder)!r} failed: {exc}") from exc


def _with_relaxed_text_encoder(model_id: str, folder: Path) -> str:
    """``model_id`` extended by the relaxed-prompt text encoder's config and whole weight file as
    stored in ``folder`` — like the main id, the same in every load dtype; the whole file, since a
    fine-tune of the main encoder may leave the probed embedding rows unchanged."""
    digest = hashlib.sha256(model_id.encode())
    digest.update(config_bytes(read_json(folder / _CONFIG_FILES["text_encoder"])))
    weights = next(folder / name for name in _WEIGHT_FILES["text_encoder"] if (folder / name).is_file())
    with open(weights, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
