"""Which Stable Diffusion family a single-file checkpoint is, read from its keys and shapes.

The family decides the shipped architecture configs (``configs/<name>/``) and the default
prediction type. Rules, in order (the README's "Single-file checkpoints" section states them):

- SDXL (``conditioner.embedders.*``), class-conditioned UNets (``label_emb``: SDXL, unCLIP, the x4
  upscaler), inpainting (9 UNet input channels) and other layouts are refused.
- The text encoder decides SD 1.x (OpenAI CLIP, ``cond_stage_model.transformer.*``) vs SD 2.x
  (OpenCLIP, ``cond_stage_model.model.*``); the cross-attention width (768 vs 1024) and the
  linear ``proj_in`` are logged and must match the shipped config (else ``config=`` is needed).
- Prediction type (not in the weights): an explicit ``prediction_type=`` wins; then a ``v_pred``
  marker key (ComfyUI's convention); then ``config=DIR``'s scheduler config; SD 1.x defaults to
  ``epsilon`` (every official SD 1.x release); SD 2.x is a guess — ``epsilon`` when the file name
  says ``512`` or ``base``, else ``v_prediction`` (the 768 release) — and says so in a warning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import (
    ConfigError,
    MissingComponentError,
    NotACheckpointError,
    UnsupportedArchitectureError,
)
from .layout import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, TextLayout

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
PREDICTION_TYPES = ("epsilon", "v_prediction")
PredictionType = Literal["epsilon", "v_prediction"]

_IN_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
_CONTEXT_KEY = re.compile(re.escape(UNET_PREFIX) + r".*\.attn2\.to_k\.weight")
_PROJ_IN_KEY = re.compile(re.escape(UNET_PREFIX) + r".*\.proj_in\.weight")
_V_PRED_MARKER = "v_pred"  # an empty tensor some trainers add to v-prediction files (ComfyUI reads it too)


@dataclass(frozen=True)
class Family:
    """A Stable Diffusion release line and the shipped diffusers configs of its architecture."""

    name: str  # folder under configs/
    title: str
    text_layout: TextLayout

    @property
    def config_dir(self) -> Path:
        return CONFIGS / self.name


SD1 = Family("sd1", "SD 1.x", "clip")
SD2_BASE = Family("sd2-base", "SD 2.x base (512, epsilon)", "open_clip")
SD2_768 = Family("sd2-768", "SD 2.x (768, v-prediction)", "open_clip")


@dataclass(frozen=True)
class Detection:
    """What the keys and shapes of a single file say about its model."""

    generation: Literal["sd1", "sd2"]
    text_layout: TextLayout
    context_width: int | None  # cross-attention width: 768 (SD 1.x), 1024 (SD 2.x)
    linear_projection: bool  # SD 2.x's transformers use linear proj_in/proj_out, SD 1.x 1×1 convs
    v_pred_marker: bool


def _starts(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect(state_dict: dict[str, torch.Tensor], path: Path) -> Detection:
    """Classify ``state_dict`` (the tensors of ``path``) or raise the error naming why it is not SD 1.x/2.x."""
    keys = list(state_dict)
    where = repr(str(path))
    if _starts(keys, "conditioner.embedders."):
        raise UnsupportedArchitectureError(
            f"{where} is an SDXL checkpoint (it has conditioner.embedders.* text encoders); gnr-fast supports "
            "Stable Diffusion 1.x and 2.x. Use an SD 1.x/2.x checkpoint."
        )
    if not _starts(keys, UNET_PREFIX):
        if _starts(keys, "down_blocks.") or _starts(keys, "encoder.down_blocks.") or _starts(keys, "text_model."):
            raise NotACheckpointError(
                f"{where} holds the weights of one diffusers component, not a whole single-file checkpoint; pass "
                "the diffusers pipeline folder it belongs to (the one with model_index.json)."
            )
        sample = ", ".join(keys[:3])
        raise NotACheckpointError(
            f"{where} is not a Stable Diffusion checkpoint: it has no UNet weights (model.diffusion_model.*; first "
            f"keys: {sample}). LoRA, embedding and VAE-only files cannot be loaded on their own; pass a full SD "
            "1.x/2.x checkpoint."
        )
    if UNET_PREFIX + "label_emb.0.0.weight" in state_dict:
        raise UnsupportedArchitectureError(
            f"{where} has a class-conditioned UNet (label_emb: SDXL, SD 2.x unCLIP or the x4 upscaler); gnr-fast "
            "supports text-to-image Stable Diffusion 1.x/2.x. Use such a checkpoint."
        )
    if _IN_CONV not in state_dict:
        raise UnsupportedArchitectureError(
            f"{where} has a UNet in another layout than SD 1.x/2.x ({_IN_CONV} is missing: an SD3/Flux-style or "
            "video model?). Use an SD 1.x/2.x checkpoint."
        )
    in_channels = state_dict[_IN_CONV].shape[1]
    if in_channels == 9:
        raise UnsupportedArchitectureError(
            f"{where} is an inpainting checkpoint (its UNet takes 9 input channels: latent, mask, masked image); "
            "GaR edits need the text-to-image model (4 channels). Use the non-inpainting release of this model."
        )
    if in_channels != 4:
        raise UnsupportedArchitectureError(
            f"{where} has a UNet with {in_channels} input channels (depth-conditioned or upscaler layout); gnr-fast "
            "needs a text-to-image SD 1.x/2.x UNet with 4. Use such a checkpoint."
        )
    if _starts(keys, CLIP_PREFIX):
        generation, layout = "sd1", "clip"
    elif _starts(keys, OPEN_CLIP_PREFIX):
        generation, layout = "sd2", "open_clip"
    else:
        raise MissingComponentError(
            f"{where} has no text encoder weights ({CLIP_PREFIX}* for SD 1.x or {OPEN_CLIP_PREFIX}* for SD 2.x); "
            "the file is incomplete. Use a full checkpoint (the pruned releases keep the text encoder)."
        )
    if not _starts(keys, VAE_PREFIX):
        raise MissingComponentError(
            f"{where} has no VAE weights ({VAE_PREFIX}*); the file is incomplete. Use a full checkpoint."
        )
    context = next((t.shape[1] for k, t in state_dict.items() if _CONTEXT_KEY.fullmatch(k)), None)
    proj_in = next((t for k, t in state_dict.items() if _PROJ_IN_KEY.fullmatch(k)), None)
    detection = Detection(
        generation=generation,  # type: ignore[arg-type]
        text_layout=layout,  # type: ignore[arg-type]
        context_width=int(context) if context is not None else None,
        linear_projection=proj_in is not None and proj_in.ndim == 2,
        v_pred_marker=_V_PRED_MARKER in state_dict,
    )
    logger.info(
        "%s: %s layout, text encoder %s, cross-attention width %s, %s projections",
        path, generation, layout, detection.context_width, "linear" if detection.linear_projection else "conv",
    )
    return detection


def check_prediction_type(prediction_type: str | None) -> None:
    """Validate a user's ``prediction_type`` (``None``: detect)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type={prediction_type!r} is not supported; use 'epsilon' (SD 1.x, SD 2.x base 512) or "
            "'v_prediction' (SD 2.x 768), or leave it unset to detect it."
        )


def choose_prediction_type(
    detection: Detection, path: Path, explicit: str | None, from_config: str | None
) -> PredictionType:
    """The prediction type of the model in ``path`` (module docstring: the rules); warns when it is a guess."""
    check_prediction_type(explicit)
    if explicit is not None:
        return explicit  # type: ignore[return-value]
    if detection.v_pred_marker:
        logger.info("%s: v_pred marker key found: v_prediction", path)
        return "v_prediction"
    if from_config is not None:
        check_prediction_type(from_config)
        return from_config  # type: ignore[return-value]
    if detection.generation == "sd1":
        return "epsilon"
    name = path.name.lower()
    guess: PredictionType = "epsilon" if ("512" in name or "base" in name) and "768" not in name else "v_prediction"
    logger.warning(
        "%s: an SD 2.x checkpoint; its prediction type cannot be read from the weights, guessing %r from the file "
        "name (SD 2.x base 512 models predict epsilon, 768 models v_prediction). Pass --prediction-type / "
        "prediction_type= to say which; a wrong one gives noise-like edits.",
        path, guess,
    )
    return guess


def shipped_family(detection: Detection, prediction_type: str) -> Family:
    """The shipped config set for a detected generation and prediction type."""
    if detection.generation == "sd1":
        return SD1
    return SD2_768 if prediction_type == "v_prediction" else SD2_BASE
