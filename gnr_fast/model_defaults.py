"""Defaults a model folder declares about itself: ``<model>/gnr_fast.json`` (ours, optional).

A diffusers pipeline folder says nothing about how to edit with it. A model may add a small JSON
file beside ``model_index.json``::

    {
      "format": 1,
      "preset": "shapes",
      "caption_grammar": {
        "name": "shapes-world",
        "summary": "one or two objects (size, colour, shape) on a background",
        "grammar": "a <size> <colour> <shape> [and a ...] on a <background>",
        "examples": ["a large red circle on a blue background", ...],
        "relaxed_text_encoder": "text_encoder_relaxed"
      }
    }

A consistency model (few-step editing, ``docs/consistency-models.md``) also names its sampler and
the three files its UNets are built from, paths relative to the folder::

    {
      "format": 1,
      "preset": "consistency",
      "sampler": "consistency",
      "consistency": {
        "teacher_unet": "teacher.pt",
        "reverse_lora": "reverse_lora.safetensors",
        "forward_lora": "forward_lora.safetensors",
        "lora_alpha": 8,
        "timesteps": [259, 519, 779, 999]
      }
    }

``sampler`` is ``"ddim"`` (the default) or ``"consistency"``, which needs the ``consistency`` object
(:class:`ConsistencyDefaults`; ``lora_alpha`` and ``timesteps`` are optional, defaults shown). A
``consistency`` object beside ``sampler: "ddim"`` (or none) *offers* the consistency sampler: the
folder edits with DDIM unless a call asks for ``sampler="consistency"`` (CLI ``--sampler
consistency``), as the bundled model does. Its optional ``preset`` (default ``"consistency"``) is the
consistency preset such edits use when a call names none.

``preset`` is the edit preset used when a call names neither a preset nor a config (the
explicit argument always wins); ``caption_grammar`` (optional) names the caption language the
model was trained on, and its examples, so unreadable prompts can be flagged
(:func:`gnr_fast.prompts.warn_if_outside_grammar`); its optional ``relaxed_text_encoder`` names a
second text-encoder subfolder for prompts the grammar's reader accepts only as a relaxed form
(:func:`gnr_fast.prompts.prompt_form`; loaded by :func:`gnr_fast.loading.load_components`). A folder without the file gets
:data:`FALLBACK_PRESET` and no grammar; a file that exists but is malformed is an error naming
the file, the field and the fix — never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .caption_grammars import grammar_reader
from .config import ALL_PRESET_NAMES, CONSISTENCY_PRESET_NAMES
from .errors import ConfigError, ModelLoadError

METADATA_NAME = "gnr_fast.json"
"""File name of the metadata inside a model folder."""
METADATA_FORMAT = 1
"""The ``format`` value this version reads."""
FALLBACK_PRESET = "nonstyle"
"""The preset of a model that declares none (the paper's preset for real images)."""
_KNOWN_KEYS = frozenset({"format", "preset", "caption_grammar", "sampler", "consistency"})
_GRAMMAR_KEYS = frozenset({"name", "summary", "grammar", "examples", "relaxed_text_encoder"})
SAMPLER_NAMES = ("ddim", "consistency")
"""Values of ``sampler``: the paper's DDIM, or the multi-boundary consistency sampler."""
_CONSISTENCY_KEYS = frozenset({"teacher_unet", "reverse_lora", "forward_lora", "lora_alpha", "timesteps", "preset"})
CONSISTENCY_TIMESTEPS = (259, 519, 779, 999)
"""The reverse consistency LoRA's boundary timesteps in the authors' ``configs/consistency.yaml``."""


@dataclass(frozen=True)
class CaptionGrammar:
    """The caption language a model was trained on: ``name`` picks the parser
    (:func:`gnr_fast.caption_grammars.grammar_reader`; ``"shapes-world"`` is
    :func:`gnr_shapes.world.captions.prompt_form`), ``examples`` are prompts
    that work (at least one).

    ``relaxed_text_encoder``: a subfolder of the model (a plain folder name) holding a second text
    encoder for the grammar's relaxed forms — prompts its reader accepts that are not captions of
    the grammar itself (:func:`gnr_fast.prompts.prompt_form`); the grammar's own captions, the empty
    prompt and unreadable prompts keep ``text_encoder/``. None: one text encoder for every prompt.
    """

    name: str
    summary: str
    grammar: str
    examples: tuple[str, ...]
    relaxed_text_encoder: str | None = None


@dataclass(frozen=True)
class ConsistencyDefaults:
    """The consistency files a model folder names (resolved against the folder), the alpha every
    LoRA module gets (8 in the authors' loader), the boundary timesteps, ascending, ending at
    the last train step, and the preset of consistency edits that name none."""

    teacher_unet: Path
    reverse_lora: Path
    forward_lora: Path
    lora_alpha: float = 8.0
    timesteps: tuple[int, ...] = CONSISTENCY_TIMESTEPS
    preset: str = "consistency"


@dataclass(frozen=True)
class ModelDefaults:
    """What a model folder declares; ``source`` is the file read, or None when there is none."""

    preset: str = FALLBACK_PRESET
    caption_grammar: CaptionGrammar | None = None
    source: Path | None = None
    sampler: str = "ddim"
    consistency: ConsistencyDefaults | None = None


def _string(value: object, path: Path, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModelLoadError(f"{path}: field {field!r} must be a non-empty string, got {value!r}; fix or delete "
                             f"the file ({METADATA_NAME} is optional)")
    return value


def _section(value: object, path: Path, name: str, allowed: frozenset[str]) -> dict:
    """``value`` as the object of section ``name``, with no key outside ``allowed``."""
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: '{name}' must be an object with keys {sorted(allowed)}, "
                             f"got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise ModelLoadError(f"{path}: unknown key(s) {sorted(unknown)} in '{name}'; "
                             f"allowed: {sorted(allowed)}")
    return value


def _grammar(value: object, path: Path) -> CaptionGrammar:
    value = _section(value, path, "caption_grammar", _GRAMMAR_KEYS)
    examples = value.get("examples")
    if not isinstance(examples, list) or not examples:
        raise ModelLoadError(f"{path}: 'caption_grammar.examples' must be a non-empty list of prompts, "
                             f"got {examples!r}")
    name = _string(value.get("name"), path, "caption_grammar.name")
    grammar_reader(name, path)  # a grammar no installed package reads is a ModelLoadError here, not per prompt
    return CaptionGrammar(
        name=name,
        summary=_string(value.get("summary"), path, "caption_grammar.summary"),
        grammar=_string(value.get("grammar"), path, "caption_grammar.grammar"),
        examples=tuple(_string(e, path, "caption_grammar.examples[]") for e in examples),
        relaxed_text_encoder=_subfolder(value.get("relaxed_text_encoder"), path, "caption_grammar.relaxed_text_encoder"),
    )


def _subfolder(value: object, path: Path, field: str) -> str | None:
    """``value`` as the name of a folder directly inside the model folder, or None when absent."""
    if value is None:
        return None
    name = _string(value, path, field)
    if Path(name).name != name or name in (".", ".."):
        raise ModelLoadError(f"{path}: field {field!r} must name a folder inside the model folder (no path "
                             f"separators), got {name!r}")
    return name


def _relative_file(value: object, path: Path, field: str) -> Path:
    """``value`` as a file path relative to the model folder (no absolute paths, no ``..``)."""
    name = _string(value, path, field)
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ModelLoadError(f"{path}: field {field!r} must be a path inside the model folder, got {name!r}")
    return path.parent / name


def _consistency(value: object, path: Path) -> ConsistencyDefaults:
    value = _section(value, path, "consistency", _CONSISTENCY_KEYS)
    alpha = value.get("lora_alpha", 8.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
        raise ModelLoadError(f"{path}: 'consistency.lora_alpha' must be a positive number, got {alpha!r}")
    timesteps = value.get("timesteps", list(CONSISTENCY_TIMESTEPS))
    if (not isinstance(timesteps, list) or not timesteps
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in timesteps)
            or sorted(set(timesteps)) != timesteps or timesteps[0] <= 0):
        raise ModelLoadError(f"{path}: 'consistency.timesteps' must be a non-empty ascending list of positive "
                             f"integer timesteps (e.g. {list(CONSISTENCY_TIMESTEPS)}), got {timesteps!r}")
    preset = value.get("preset", "consistency")
    if preset not in CONSISTENCY_PRESET_NAMES:
        raise ConfigError(f"{path}: 'consistency.preset' {preset!r} is not a consistency preset; choose one of "
                          f"{list(CONSISTENCY_PRESET_NAMES)} or delete the key")
    return ConsistencyDefaults(
        preset=preset,
        teacher_unet=_relative_file(value.get("teacher_unet"), path, "consistency.teacher_unet"),
        reverse_lora=_relative_file(value.get("reverse_lora"), path, "consistency.reverse_lora"),
        forward_lora=_relative_file(value.get("forward_lora"), path, "consistency.forward_lora"),
        lora_alpha=float(alpha),
        timesteps=tuple(timesteps),
    )


def parse_model_defaults(data: object, path: Path) -> ModelDefaults:
    """Validate the decoded JSON ``data`` of ``path``.

    Raises :class:`ModelLoadError` for a wrong structure (not an object, unknown keys, wrong
    types, an unsupported ``format``) and :class:`ConfigError` for a ``preset`` that is not one
    of :data:`gnr_fast.config.ALL_PRESET_NAMES`.
    """
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise ModelLoadError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KNOWN_KEYS)}")
    if data.get("format") != METADATA_FORMAT:
        raise ModelLoadError(f"{path}: 'format' must be {METADATA_FORMAT}, got {data.get('format')!r}; "
                             "this gnr-fast reads only that version")
    preset = data.get("preset", FALLBACK_PRESET)
    if preset not in ALL_PRESET_NAMES:
        raise ConfigError(f"{path}: preset {preset!r} is unknown; choose one of {list(ALL_PRESET_NAMES)} "
                          "or delete the 'preset' key")
    grammar = data.get("caption_grammar")
    sampler = data.get("sampler", "ddim")
    if sampler not in SAMPLER_NAMES:
        raise ModelLoadError(f"{path}: 'sampler' must be one of {list(SAMPLER_NAMES)}, got {sampler!r}")
    if sampler == "consistency" and "consistency" not in data:
        raise ModelLoadError(f"{path}: 'sampler': 'consistency' and the 'consistency' object (the teacher UNet and "
                             "LoRA files) go together; add the object (alone, it offers the consistency sampler "
                             "beside the default DDIM one)")
    consistency = _consistency(data["consistency"], path) if "consistency" in data else None
    return ModelDefaults(preset=preset, caption_grammar=None if grammar is None else _grammar(grammar, path),
                         source=path, sampler=sampler, consistency=consistency)


def load_model_defaults(folder: str | Path) -> ModelDefaults:
    """The defaults ``folder`` declares in ``gnr_fast.json``; :class:`ModelDefaults()` (preset
    ``nonstyle``, no grammar) when the file does not exist. Malformed files raise (see
    :func:`parse_model_defaults`); unreadable or non-JSON files raise :class:`ModelLoadError`."""
    path = Path(folder) / METADATA_NAME
    if not path.exists():
        return ModelDefaults()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read model metadata {path}: {exc}; fix the JSON or delete the file "
                             f"({METADATA_NAME} is optional)") from exc
    return parse_model_defaults(data, path)
