"""The caption grammar of the shapes world, and its parser.

Grammar (every caption is exactly one of these)::

    caption    := object [" and " object] " on " ("a" | "an") " " background
    object     := ("a" | "an") " " size " " colour " " shape
    background := colour " background"
                | colour " to " colour " gradient background"
                | colour " and " colour " striped background"
                | colour " and " colour " checkered background"

The size word is always present, so a caption fixes every attribute except the layout: where
the objects are, and which colour of a striped or checkered background comes first (a
gradient's "red to blue" does fix its direction: red at the top).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gnr_fast.errors import InputError
from gnr_fast.world.palette import COLOUR_NAMES, SHAPES, SIZES

if TYPE_CHECKING:
    from gnr_fast.world.scenes import SceneSpec

_BACKGROUND_TEMPLATES = {
    "gradient": "{0} to {1} gradient background",
    "stripes": "{0} and {1} striped background",
    "checks": "{0} and {1} checkered background",
}


@dataclass(frozen=True)
class CaptionObject:
    """The attributes a caption states about one object."""

    size: str
    colour: str
    shape: str


@dataclass(frozen=True)
class ParsedCaption:
    """Everything a caption states: background kind and colours, objects in order."""

    background_kind: str
    background_colours: tuple[str, ...]
    objects: tuple[CaptionObject, ...]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe_background(kind: str, colours: tuple[str, ...]) -> str:
    """The background phrase of the grammar, e.g. "blue background"."""
    if kind == "plain":
        return f"{colours[0]} background"
    return _BACKGROUND_TEMPLATES[kind].format(*colours)


def caption_for(spec: "SceneSpec") -> str:
    """The caption of ``spec``; :func:`parse_caption` inverts it exactly."""
    phrases = [f"{_article(o.size)} {o.size} {o.colour} {o.shape}" for o in spec.objects]
    background = describe_background(spec.background.kind, spec.background.colours)
    return f"{' and '.join(phrases)} on {_article(background)} {background}"


_COLOUR = "(" + "|".join(COLOUR_NAMES) + ")"
_OBJECT = rf"an? ({'|'.join(SIZES)}) {_COLOUR} ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"^{_OBJECT}(?: and {_OBJECT})? on an? (.+)$")
_BACKGROUNDS = [("plain", re.compile(rf"^{_COLOUR} background$"))] + [
    (kind, re.compile("^" + template.format(_COLOUR, _COLOUR) + "$"))
    for kind, template in _BACKGROUND_TEMPLATES.items()
]


def parse_caption(caption: str) -> ParsedCaption:
    """Parse a caption of the grammar; raises :class:`InputError` for anything else."""
    match = _CAPTION.match(caption.strip())
    if match is None:
        raise InputError(f"caption {caption!r} does not follow the shapes-world grammar")
    groups = match.groups()
    objects = [CaptionObject(*groups[0:3])]
    if groups[3] is not None:
        objects.append(CaptionObject(*groups[3:6]))
    for kind, pattern in _BACKGROUNDS:
        bg = pattern.match(groups[6])
        if bg is not None:
            return ParsedCaption(kind, tuple(bg.groups()), tuple(objects))
    raise InputError(f"background phrase {groups[6]!r} of caption {caption!r} is not in the grammar")
