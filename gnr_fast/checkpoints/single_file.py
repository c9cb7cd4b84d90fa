"""Single-file SD 1.x/2.x checkpoint → diffusers modules, offline, through diffusers' single-file loading.

The architecture comes from shipped diffusers configs (``configs/sd1``, ``configs/sd2-base``,
``configs/sd2-768``) or from a user's ``config=DIR``; diffusers' ``from_single_file(config=DIR)``
converts and loads the weights, so no hub is ever contacted. Every key and shape the architecture
needs is checked against the file first, because diffusers loads with ``strict=False``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import (
    MissingComponentError,
    ModelLoadError,
    ModelNotFoundError,
    NotACheckpointError,
    UnsupportedArchitectureError,
)
from ..model_files import BUNDLED_MODEL, read_json
from .families import (
    Detection,
    check_prediction_type,
    choose_prediction_type,
    detect,
    shipped_family,
)
from .layout import (
    TextLayout,
    expected_shapes,
    text_encoder_keys,
    unet_keys,
    vae_keys,
    with_clip_text_model_prefix,
)
from .reading import SINGLE_FILE_SUFFIXES, read_state_dict, weights_dtype

logger = logging.getLogger(__name__)

_MODEL_CONFIGS = ("unet/config.json", "vae/config.json", "text_encoder/config.json")
_TOKENIZER_SETTINGS = ("model_max_length", "bos_token", "eos_token", "unk_token", "pad_token", "do_lower_case")


@dataclass
class SingleFileModules:
    """The loaded modules of one single-file checkpoint, on the CPU in the asked dtype."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict  # DDIMScheduler config with the chosen prediction_type
    architecture: str  # "SD 1.x", … or the config folder that described it
    config_dir: Path
    dtype: torch.dtype


def _read_json(path: Path) -> dict:
    return read_json(path, advice="Fix or replace the file.")


def check_config_dir(config: Path) -> None:
    """Validate a user's ``config=DIR``: diffusers configs of an SD 1.x/2.x-style UNet, VAE and CLIP text encoder."""
    if not config.is_dir():
        raise ModelLoadError(
            f"config={str(config)!r} (--model-config) is not a folder. Pass a folder with diffusers component "
            "configs: unet/config.json, vae/config.json, text_encoder/config.json (scheduler/ and tokenizer/ optional)."
        )
    for rel in _MODEL_CONFIGS:
        if not (config / rel).is_file():
            raise MissingComponentError(
                f"config={str(config)!r} (--model-config) lacks {rel}. It needs unet/config.json, vae/config.json and "
                "text_encoder/config.json in diffusers format (e.g. the config files of the model's diffusers release)."
            )
    unet = _read_json(config / "unet/config.json")
    if unet.get("addition_embed_type") is not None or unet.get("class_embed_type") is not None:
        raise UnsupportedArchitectureError(
            f"config={str(config)!r}: its UNet has extra conditioning (addition_embed_type="
            f"{unet.get('addition_embed_type')!r}, class_embed_type={unet.get('class_embed_type')!r}), as SDXL does; "
            "gnr-fast supports SD 1.x/2.x UNets."
        )


def _meta_models(config_dir: Path) -> tuple[Any, Any, Any]:
    """UNet, VAE and text encoder of ``config_dir`` on the meta device (shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    return unet, vae, text_encoder


def expected_tensors(config_dir: Path, text_layout: TextLayout) -> dict[str, tuple[int, ...]]:
    """Every single-file key the architecture in ``config_dir`` needs, with its shape."""
    unet, vae, text_encoder = _meta_models(config_dir)
    expected: dict[str, tuple[int, ...]] = {}
    for module, place in (
        (unet, lambda names: unet_keys(names, unet.config)),
        (vae, lambda names: vae_keys(names, vae.config)),
        (text_encoder, lambda names: text_encoder_keys(names, text_layout)),
    ):
        shapes = {name: p.shape for name, p in module.named_parameters()}
        expected.update(expected_shapes(shapes, place(shapes)))
    return expected


def check_weights(
    state_dict: dict[str, torch.Tensor], config_dir: Path, detection: Detection, path: Path, architecture: str
) -> None:
    """Raise unless ``state_dict`` has every tensor of the architecture in ``config_dir``, in its shape."""
    expected = expected_tensors(config_dir, detection.text_layout)
    # shapes first: a file of another architecture also lacks keys, but its wrong shapes say why
    present = [k for k in expected if k in state_dict]
    wrong = [(k, tuple(state_dict[k].shape), expected[k]) for k in present if tuple(state_dict[k].shape) != expected[k]]
    if wrong:
        key, found, want = wrong[0]
        raise UnsupportedArchitectureError(
            f"{str(path)!r} does not fit the {architecture} architecture: {len(wrong)} tensors have other shapes "
            f"(e.g. {key}: {list(found)} in the file, {list(want)} in the config; cross-attention width "
            f"{detection.context_width}). Pass --model-config DIR / config=DIR with the diffusers configs "
            "(unet/, vae/, text_encoder/config.json) of this model's architecture."
        )
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise MissingComponentError(
            f"{str(path)!r} lacks {len(missing)} of the {len(expected)} tensors of {architecture} (e.g. "
            f"{', '.join(missing[:3])}); the file is incomplete or was stripped by a tool. Use a complete checkpoint "
            "(re-download it), or pass --model-config / config= if its architecture differs."
        )


def _load_tokenizer(config_dir: Path, family_dir: Path) -> Any:
    """``config_dir``'s tokenizer; one with only tokenizer_config.json reuses the bundled model's CLIP BPE files.

    The bundled model's vocabulary is the 49,408-token CLIP BPE vocabulary of SD 1.x, and SD 2.x's
    OpenCLIP tokenizer uses the same one (it differs in padding with ``!``, set by the config).
    A ``config_dir`` without a tokenizer/ folder takes the detected family's settings (``family_dir``).
    """
    from transformers import CLIPTokenizer

    folder = config_dir / "tokenizer" if (config_dir / "tokenizer").is_dir() else family_dir / "tokenizer"
    has_vocab = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    if has_vocab:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    settings = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    overrides = {k: settings[k] for k in _TOKENIZER_SETTINGS if k in settings}
    return CLIPTokenizer.from_pretrained(BUNDLED_MODEL / "tokenizer", local_files_only=True, **overrides)


def load_single_file(
    path: str | Path, dtype: torch.dtype | None, prediction_type: str | None = None, config: str | Path | None = None
) -> SingleFileModules:
    """Load a single-file SD 1.x/2.x checkpoint (families.py: detection and prediction-type rules).

    ``config``: a folder with diffusers component configs, for files whose architecture differs
    from the shipped SD 1.x / SD 2.x ones. Weights stored in float16/bfloat16 are cast to ``dtype``
    (``None``: keep the dtype most of the file's weights are stored in).
    Raises a :class:`ModelLoadError` subclass naming the file and the fix for every bad file.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"checkpoint file {str(path)!r} does not exist; pass the path of a .safetensors/.ckpt file.")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise NotACheckpointError(
            f"{str(path)!r} is not named like a single-file checkpoint ({path.suffix or 'no suffix'}); expected one of "
            f"{', '.join(SINGLE_FILE_SUFFIXES)}. Rename it if it is one."
        )
    check_prediction_type(prediction_type)
    config_dir = Path(config) if config is not None else None
    if config_dir is not None:
        check_config_dir(config_dir)
    state_dict = with_clip_text_model_prefix(read_state_dict(path))
    detection = detect(state_dict, path)
    scheduler_file = config_dir / "scheduler" / "scheduler_config.json" if config_dir is not None else None
    user_scheduler = _read_json(scheduler_file) if scheduler_file is not None and scheduler_file.is_file() else None
    chosen = choose_prediction_type(
        detection, path, prediction_type, user_scheduler.get("prediction_type") if user_scheduler else None
    )
    family = shipped_family(detection, chosen)
    if config_dir is None:
        config_dir, architecture = family.config_dir, family.title
    else:
        architecture = f"--model-config {str(config_dir)!r}"
    check_weights(state_dict, config_dir, detection, path, architecture)
    dtype = dtype if dtype is not None else weights_dtype(state_dict)

    # float32 needs no cast: the models are built in float32 and load_state_dict upcasts float16/bfloat16 weights
    # (and diffusers warns on every cast of a model, even one without fp32-only modules)
    cast = None if dtype == torch.float32 else dtype
    common = {"config": str(config_dir), "local_files_only": True, "torch_dtype": cast}
    try:
        unet = UNet2DConditionModel.from_single_file(
            state_dict, subfolder="unet", extract_ema=True, low_cpu_mem_usage=False, **common
        )
        vae = AutoencoderKL.from_single_file(state_dict, subfolder="vae", low_cpu_mem_usage=False, **common)
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, checkpoint=state_dict, subfolder="text_encoder", **common
        )
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        raise ModelLoadError(
            f"loading {str(path)!r} with the {architecture} configs failed: {exc}. Pass --model-config DIR with "
            "the diffusers configs of this model's architecture."
        ) from exc
    tokenizer = _load_tokenizer(config_dir, family.config_dir)
    scheduler_config = dict(user_scheduler or _read_json(family.config_dir / "scheduler" / "scheduler_config.json"))
    scheduler_config["prediction_type"] = chosen
    logger.info("loaded single file %s as %s (%s, %s)", path, architecture, chosen, dtype)
    return SingleFileModules(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        architecture=architecture,
        config_dir=config_dir,
        dtype=dtype,
    )
