"""Caption grammars: the readers that tell how a prompt relates to the caption language a model
declares (``caption_grammar.name`` in its gnr_fast.json, :mod:`gnr_fast.model_defaults`).

The engine holds no grammar of its own. A package provides one through the Python entry point
group :data:`ENTRY_POINT_GROUP` (the bundled model's ``shapes-world`` grammar comes from
``gnr_shapes``, declared in pyproject.toml), or in-process through :func:`register_grammar`.
Entry points are read on the first look-up, never at import, so importing ``gnr_fast`` imports no
grammar package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Literal

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "gnr_fast.caption_grammars"
"""The entry point group a grammar package declares its readers in (name → ``module:reader``)."""

PromptForm = Literal["grammar", "relaxed", "outside"]
"""How a prompt relates to a caption grammar: one of its captions, one of its relaxed forms (read,
but not a caption of the grammar itself), or neither."""

GrammarReader = Callable[[str], PromptForm]
"""A grammar's reader: a non-empty prompt → its :data:`PromptForm` in that grammar."""

_registered: dict[str, GrammarReader] = {}


def register_grammar(name: str, reader: GrammarReader) -> None:
    """Make ``reader`` the reader of grammar ``name`` in this process (before or instead of an
    entry point of that name)."""
    _registered[name] = reader


def _declared() -> dict[str, EntryPoint]:
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def grammar_names() -> list[str]:
    """The grammars this installation can read: registered ones and declared entry points."""
    return sorted(set(_registered) | set(_declared()))


def grammar_reader(name: str, source: Path | str = "caption_grammar") -> GrammarReader:
    """The reader of grammar ``name``: a registered one, else the entry point of that name, loaded
    (and kept) on first use.

    Raises :class:`ModelLoadError` naming ``source`` (the model's gnr_fast.json) when no installed
    package provides ``name``, or when its entry point cannot be loaded.
    """
    reader = _registered.get(name)
    if reader is not None:
        return reader
    point = _declared().get(name)
    if point is None:
        known = ", ".join(grammar_names()) or "none"
        raise ModelLoadError(
            f"{source}: caption grammar {name!r} is not provided by any installed package (entry point group "
            f"{ENTRY_POINT_GROUP!r}; installed: {known}); install the package that defines it"
        )
    try:
        reader = point.load()
    except ImportError as exc:
        raise ModelLoadError(f"{source}: caption grammar {name!r} ({point.value}) cannot be loaded: {exc}") from exc
    logger.info("caption grammar %r read by %s", name, point.value)
    _registered[name] = reader
    return reader
