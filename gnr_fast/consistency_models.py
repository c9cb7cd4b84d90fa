"""The two consistency UNets of a few-step edit, built from the files the Inverse-and-Edit authors distribute.

A consistency model (iCD, arXiv 2406.14539) is made of an SD 1.x pipeline folder plus three files:

* a guidance-distilled *teacher* UNet: a plain ``torch.save`` state dict of the pipeline's UNet
  architecture with a guidance-scale embedding (``time_embedding.cond_proj.weight`` [C0, W]: the
  UNet's ``time_cond_proj_dim`` is W), read with ``torch.load(weights_only=True)`` only;
* a *reverse* consistency LoRA (editing, t = 999 → 0) and a *forward* one (inversion, 0 → 999):
  PEFT safetensors files (:mod:`gnr_fast.lora`).

Each LoRA is fused into its own copy of the teacher once, at load (README_consistency.md §1); the
pipeline folder's own UNet weights are never used. :func:`load_consistency_model` loads a whole
consistency model for :class:`~gnr_fast.Editor` (the engine's session with two executors and the
consistency sampler: :mod:`gnr_fast.session`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptCheckpointError, ModelLoadError, ModelNotFoundError, UnsupportedArchitectureError
from .families import GuidanceEmbeddingSD, family_for
from .fingerprint import fingerprint, unet_fingerprint
from .loading import Components, load_components, read_json
from .lora import DEFAULT_LORA_ALPHA, fuse_lora, read_lora
from .model_defaults import ModelDefaults, load_model_defaults
from .model_files import BUNDLED_MODEL
from .precision import ModelDtype, PrecisionPolicy
from .samplers.consistency import ConsistencySampler

logger = logging.getLogger(__name__)

COND_PROJ_KEY = "time_embedding.cond_proj.weight"
"""The guidance-embedding projection a guidance-distilled UNet's state dict must hold ([C0, W])."""


@dataclass(frozen=True)
class ConsistencyFiles:
    """Where the three consistency files are; ``lora_alpha`` is the alpha every LoRA module gets."""

    teacher_unet: Path
    reverse_lora: Path
    forward_lora: Path
    lora_alpha: float = DEFAULT_LORA_ALPHA


@dataclass
class ConsistencyUNets:
    """The fused consistency UNets (float32 fusing, then ``dtype``), both with a guidance embedding."""

    reverse: Any  # diffusers.UNet2DConditionModel: editing jumps
    forward: Any  # diffusers.UNet2DConditionModel: inversion jumps
    files: ConsistencyFiles

    @property
    def guidance_embedding_dim(self) -> int:
        return int(self.reverse.config.time_cond_proj_dim)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` state dict saved with ``torch.save``, loaded with ``weights_only=True``.

    A missing file raises :class:`ModelNotFoundError`; a file that is not a weights-only pickle (an
    arbitrary object, a pickled module) or not a flat dict of tensors raises
    :class:`CorruptCheckpointError` — never unpickling arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"teacher UNet file {str(path)!r} does not exist; pass the state-dict file (.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(
            f"teacher UNet file {str(path)!r} is not a plain state dict readable with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); save it with "
            "torch.save(unet.state_dict(), path)"
        ) from exc
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CorruptCheckpointError(
            f"teacher UNet file {str(path)!r} holds a {type(state).__name__}, not a flat {{name: tensor}} state dict; "
            "save it with torch.save(unet.state_dict(), path)"
        )
    return state


def load_guidance_unet(unet_config: dict, teacher_path: str | Path) -> Any:
    """The teacher UNet: the pipeline's UNet architecture with the guidance embedding the state dict
    carries (``time_cond_proj_dim`` from ``cond_proj``'s width), every parameter from the file (strict).

    Raises :class:`UnsupportedArchitectureError` for a state dict without ``cond_proj`` (not a
    guidance-distilled UNet) and :class:`ModelLoadError` for one that does not fit the architecture.
    """
    from diffusers import UNet2DConditionModel

    state = read_state_dict(teacher_path)
    cond_proj = state.get(COND_PROJ_KEY)
    if cond_proj is None or cond_proj.dim() != 2:
        raise UnsupportedArchitectureError(
            f"teacher UNet {str(teacher_path)!r} has no guidance-scale embedding ({COND_PROJ_KEY!r} is missing): "
            "a consistency model needs the guidance-distilled UNet (time_cond_proj_dim), not a plain SD UNet"
        )
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = int(cond_proj.shape[1])
    unet = UNet2DConditionModel.from_config(config)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise ModelLoadError(
            f"teacher UNet {str(teacher_path)!r} does not fit the pipeline's unet/config.json "
            f"({' '.join(first[:2])[:300]}); use the teacher trained for this pipeline"
        ) from exc
    return unet


def load_consistency_unets(
    unet_config: dict, files: ConsistencyFiles, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ConsistencyUNets:
    """The reverse and forward consistency UNets: the teacher with each LoRA fused (float32), then
    cast to ``dtype``, frozen, in eval mode, on ``device``. Every bad file raises a
    :class:`ModelLoadError` (see :func:`read_state_dict`, :func:`load_guidance_unet`,
    :func:`gnr_fast.lora.read_lora`, :func:`gnr_fast.lora.fuse_lora`)."""
    teacher = load_guidance_unet(unet_config, files.teacher_unet)
    reverse_pairs = read_lora(files.reverse_lora)
    forward_pairs = read_lora(files.forward_lora)
    unets = []
    for pairs, name in ((reverse_pairs, files.reverse_lora), (forward_pairs, files.forward_lora)):
        unet = copy.deepcopy(teacher)
        fuse_lora(unet, pairs, files.lora_alpha, source=f"LoRA {str(name)!r}")
        if dtype != torch.float32:  # torch's cast: diffusers' ModelMixin.to warns about keep-in-float32 modules
            torch.nn.Module.to(unet, dtype=dtype)
        unets.append(unet.to(device).eval().requires_grad_(False))
    logger.info("consistency UNets from %s (+ %s, %s), guidance embedding %d", files.teacher_unet,
                files.reverse_lora.name, files.forward_lora.name, unets[0].config.time_cond_proj_dim)
    return ConsistencyUNets(reverse=unets[0], forward=unets[1], files=files)


def is_consistency_model(path: object) -> bool:
    """Whether ``path`` is a model folder whose ``gnr_fast.json`` names the consistency sampler."""
    return isinstance(path, (str, Path)) and Path(path).is_dir() and load_model_defaults(path).sampler == "consistency"


@dataclass
class ConsistencyModel:
    """A loaded consistency model: the pipeline's components with the reverse (editing) UNet as
    ``components.unet`` and a model id covering both fused UNets, the forward (inversion) UNet, the
    sampler of its boundaries, the preset of edits that name none, and the folder's defaults."""

    components: Components
    forward: Any  # diffusers.UNet2DConditionModel
    sampler: ConsistencySampler
    preset: str
    defaults: ModelDefaults


def load_consistency_model(
    path: str | Path | None,
    device: str | torch.device = "cpu",
    dtype: ModelDtype = "auto",
    teacher_unet: str | Path | None = None,
    reverse_lora: str | Path | None = None,
    forward_lora: str | Path | None = None,
    lora_alpha: float | None = None,
    precision: PrecisionPolicy | None = None,
) -> ConsistencyModel:
    """An SD 1.x pipeline folder and its consistency files: those ``gnr_fast.json`` names
    (``docs/consistency-models.md``), each replaced by an explicit argument when given. The UNets are
    fused in float32 and then cast to the model dtype (``dtype``/``precision`` as for
    :func:`~gnr_fast.loading.load_components`). A folder naming no files, with not all three given,
    raises :class:`ModelLoadError`, as does every bad file (:func:`load_consistency_unets`).
    ``path`` None: the bundled model."""
    path = Path(path) if path is not None else BUNDLED_MODEL
    defaults = load_model_defaults(path)
    named = defaults.consistency
    explicit = (teacher_unet, reverse_lora, forward_lora)
    if named is None and any(f is None for f in explicit):
        raise ModelLoadError(
            f"{str(path)!r} names no consistency files (no 'consistency' object in its gnr_fast.json); pass "
            "teacher_unet=, reverse_lora= and forward_lora= (CLI: --teacher-unet, --reverse-lora, --forward-lora)"
        )
    files = ConsistencyFiles(
        teacher_unet=Path(teacher_unet) if teacher_unet is not None else named.teacher_unet,
        reverse_lora=Path(reverse_lora) if reverse_lora is not None else named.reverse_lora,
        forward_lora=Path(forward_lora) if forward_lora is not None else named.forward_lora,
        lora_alpha=float(lora_alpha) if lora_alpha is not None else (named.lora_alpha if named else DEFAULT_LORA_ALPHA),
    )
    components = load_components(path, device=device, dtype=dtype, precision=precision)
    unets = load_consistency_unets(read_json(path / "unet" / "config.json"), files, components.dtype, components.device)
    if not isinstance(family_for(unets.reverse.config), GuidanceEmbeddingSD):
        raise ModelLoadError("a consistency edit needs UNets with a guidance-scale embedding (time_cond_proj_dim)")
    boundaries = tuple(named.timesteps) if named is not None else ConsistencySampler.boundaries
    sampler = ConsistencySampler(components.schedule.alphas_cumprod, boundaries)
    model_id = fingerprint([], [], [components.model_id.encode(), unet_fingerprint(unets.reverse).encode(),
                                    unet_fingerprint(unets.forward).encode(), repr(boundaries).encode()])
    # the pipeline's own UNet weights are never used: the reverse UNet takes its place
    components = dataclasses.replace(components, unet=unets.reverse, model_id=model_id)
    return ConsistencyModel(components, unets.forward, sampler, named.preset if named else "consistency", defaults)
