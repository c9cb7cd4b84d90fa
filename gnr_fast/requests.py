"""Edit requests and the one function that validates and resolves them (used by every entry point)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import CONSISTENCY_PRESET_NAMES, EditConfig
from .errors import ConfigError, InputError
from .images import ImageInput, PreparedImage, prepare_image
from .inversion import Inversion
from .prompts import check_prompt
from .session import EditSession


@dataclass(frozen=True, eq=False)
class EditRequest:
    """One edit; the fields mean what the arguments of :meth:`Editor.edit` mean."""

    source: ImageInput | Inversion  # an image (inverted first) or an inversion of one
    target_prompt: str
    source_prompt: str | None = None  # required with an image; must match an inversion's
    preset: str | None = None  # None: the editor's default preset
    config: EditConfig | str | Path | None = None  # overrides preset
    num_steps: int | None = None


BatchRequest = EditRequest
"""The name :func:`gnr_fast.batch.edit_batch` documents its requests under."""


@dataclass(eq=False)
class ResolvedRequest:
    """A validated request: its config, and its inversion or (still to be inverted) its image."""

    index: int
    request: EditRequest
    config: EditConfig
    inversion: Inversion | None = None
    image: PreparedImage | None = None  # set while the inversion is still to be computed
    inversion_s: float = 0.0

    @property
    def source_prompt(self) -> str:
        return self.inversion.source_prompt if self.inversion is not None else self.request.source_prompt


def preset_name(session: EditSession, preset: str | None) -> str:
    """The preset an edit runs: ``preset`` if given, else the session's default preset (the one place
    that default is resolved)."""
    return preset if preset is not None else getattr(session, "default_preset", "nonstyle")


def resolve_config(
    session: EditSession, preset: str | None = None, config: EditConfig | str | Path | None = None, num_steps: int | None = None
) -> EditConfig:
    """The config an edit runs: ``config`` (object or YAML path) if given, else the named preset (with
    the session's step count when ``num_steps`` is None: a consistency model's, else the preset's)."""
    if config is None:
        name = preset_name(session, preset)
        fixed = getattr(session, "fixed_sampler", None)  # a consistency model's sampler (as preset_name, any session)
        if fixed is not None and name not in CONSISTENCY_PRESET_NAMES:
            raise ConfigError(f"preset {name!r} is a DDIM preset; a consistency model takes "
                              f"{list(CONSISTENCY_PRESET_NAMES)} (or a config of its step count)")
        return EditConfig.preset(name, num_steps if num_steps is not None or fixed is None else fixed.num_steps)
    if isinstance(config, (str, Path)):
        config = EditConfig.from_yaml(config)
    if not isinstance(config, EditConfig):
        raise ConfigError(f"config must be an EditConfig or a YAML path, got {type(config).__name__}")
    if num_steps is not None and num_steps != config.num_steps:
        config = config.with_steps(num_steps)
    return config


def check_steps(num_steps: object, name: str = "num_steps") -> None:
    """Raise :class:`InputError` unless ``num_steps`` is an integer in [1, 1000]."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= 1000:
        raise InputError(f"{name} must be an integer in [1, 1000], got {num_steps!r}")


def resolve_request(session: EditSession, request: EditRequest, index: int | None = None) -> ResolvedRequest:
    """Check ``request`` and resolve its config; read its image when it has no inversion yet.

    ``index`` names the request in messages (``requests[i].…``) when it is part of a batch.
    Raises :class:`InputError` / :class:`ConfigError` naming the field, the value and the fix.
    """
    prefix = "" if index is None else f"requests[{index}]."
    if not isinstance(request, EditRequest):
        raise InputError(f"{prefix.rstrip('.') or 'request'} must be a BatchRequest (EditRequest), got {type(request).__name__}")
    check_prompt(request.target_prompt, f"{prefix}target_prompt")
    if request.num_steps is not None:
        check_steps(request.num_steps, f"{prefix}num_steps")
    position = 0 if index is None else index
    if isinstance(request.source, Inversion):
        inversion = request.source
        if request.source_prompt is not None and request.source_prompt != inversion.source_prompt:
            raise InputError(
                f"{prefix}source_prompt {request.source_prompt!r} differs from the inversion's "
                f"{inversion.source_prompt!r}; omit source_prompt or invert again"
            )
        steps = inversion.num_steps if request.num_steps is None else request.num_steps
        config = resolve_config(session, request.preset, request.config, steps)
        session.sampler_for(config)  # a config the model's sampler cannot run: ConfigError now
        precision = session.components.precision
        inversion.check_compatible(session.model_id, config.num_steps, dtype=session.components.dtype,
                                   allow_dtype_mismatch=precision.allow_dtype_mismatch)
        return ResolvedRequest(position, request, config, inversion=inversion)
    if request.source_prompt is None:
        raise InputError(f"{prefix}source_prompt is required when editing an image (it describes the input image)")
    check_prompt(request.source_prompt, f"{prefix}source_prompt")
    config = resolve_config(session, request.preset, request.config, request.num_steps)
    session.sampler_for(config)
    return ResolvedRequest(position, request, config, image=prepare_image(request.source, max_pixels=session.max_pixels))
