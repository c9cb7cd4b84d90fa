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

Since the relaxed-caption fine-tune the bundled model also reads the relaxed forms of
:data:`CAPTION_FORMS` ("a red circle on blue", "red disc, blue background", ...):
:func:`relaxed_caption` writes them and :func:`parse_prompt` reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gnr_fast.caption_grammars import PromptForm
from gnr_fast.errors import InputError
from gnr_shapes.world.palette import COLOUR_NAMES, SHAPES, SIZES

if TYPE_CHECKING:
    import numpy as np

    from gnr_shapes.world.specs import SceneSpec

_BACKGROUND_TEMPLATES = {
    "gradient": "{0} to {1} gradient background",
    "stripes": "{0} and {1} striped background",
    "checks": "{0} and {1} checkered background",
}


@dataclass(frozen=True)
class CaptionObject:
    """The attributes a caption states about one object."""

    size: str | None  # None only from parse_prompt, for a prompt without a size word
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


def caption_for(spec: SceneSpec) -> str:
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
    parsed = _grammar_caption(match)
    if parsed is None:
        raise InputError(f"background phrase {match.group(7)!r} of caption {caption!r} is not in the grammar")
    return parsed


def _grammar_caption(match: re.Match[str]) -> ParsedCaption | None:
    """The caption a :data:`_CAPTION` match describes; None when its background is not in the grammar."""
    groups = match.groups()
    objects = [CaptionObject(*groups[0:3])]
    if groups[3] is not None:
        objects.append(CaptionObject(*groups[3:6]))
    for kind, pattern in _BACKGROUNDS:
        bg = pattern.match(groups[6])
        if bg is not None:
            return ParsedCaption(kind, tuple(bg.groups()), tuple(objects))
    return None


def is_grammar_caption(prompt: str) -> bool:
    """Whether ``prompt`` is a caption of the grammar as the text encoder reads it (CLIP's tokenizer
    ignores case and repeated spaces; anything else, a final full stop included, makes it another
    prompt)."""
    match = _CAPTION.match(" ".join(prompt.lower().split()))
    return match is not None and _grammar_caption(match) is not None


# --- Relaxed captions: the forms people write -------------------------------------------------
#
# The bundled model was first trained on the grammar above only. These are the other ways the
# same scene is commonly described; ``relaxed_caption`` writes them (for training and for the
# prompt-robustness benchmark) and ``parse_prompt`` reads them back.

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "disk", "ball"),
    "square": ("box", "block"),
    "triangle": (),
}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"large": ("big",), "small": ("little",)}

_SHORT_BACKGROUND_TEMPLATES = {
    "plain": "{0}",
    "gradient": "{0} to {1} gradient",
    "stripes": "{0} and {1} stripes",
    "checks": "{0} and {1} checks",
}

# Named relaxed forms, each one change from the grammar (the benchmark measures them one by one):
#   no_size      "a red circle on a blue background"
#   synonym      "a large red disc on a blue background" (disc/disk/ball, box/block, big/little)
#   short        "a red circle on blue"           (no size, background noun and article dropped)
#   comma        "red circle, blue background"    (no size, no articles)
#   plain_word   "a red circle on a plain blue background" (no size; "plain" on plain backgrounds)
RELAXED_FORMS: tuple[str, ...] = ("no_size", "synonym", "short", "comma", "plain_word")
CAPTION_FORMS: tuple[str, ...] = ("full", *RELAXED_FORMS)


def _object_phrase(size: str | None, colour: str, shape: str, article: bool) -> str:
    words = [w for w in (size, colour, shape) if w]
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}" if article else phrase


def compose_caption(spec: SceneSpec, *, size: bool = True, shape_words: tuple[str, ...] | None = None,
                    size_words: tuple[str, ...] | None = None, background: str = "full",
                    articles: bool = True, comma: bool = False) -> str:
    """A caption of ``spec`` with the chosen relaxations.

    ``size``: state the size word; ``shape_words`` / ``size_words``: the word used for each
    object's shape / size (default: the grammar's); ``background``: "full" (the grammar's
    phrase), "plain_word" ("plain blue background" on plain backgrounds, else "full") or
    "short" ("blue", "red to blue gradient", "red and blue stripes" / "checks");
    ``articles``: "a"/"an" before objects and the background; ``comma``: "<objects>,
    <background>" instead of "<objects> on <background>". With all defaults this is
    :func:`caption_for`.
    """
    phrases = []
    for i, obj in enumerate(spec.objects):
        shape = shape_words[i] if shape_words else obj.shape
        size_word = (size_words[i] if size_words else obj.size) if size else None
        phrases.append(_object_phrase(size_word, obj.colour, shape, articles))
    kind, colours = spec.background.kind, spec.background.colours
    if background == "short":
        bg = _SHORT_BACKGROUND_TEMPLATES[kind].format(*colours)
    elif background == "plain_word" and kind == "plain":
        bg = f"plain {colours[0]} background"
    elif background in ("full", "plain_word"):
        bg = describe_background(kind, colours)
    else:
        raise ValueError(f"background must be 'full', 'plain_word' or 'short', got {background!r}")
    if articles and not (background == "short" and kind in ("plain", "stripes", "checks")):
        bg = f"{_article(bg)} {bg}"
    joiner = ", " if comma else " on "
    return f"{' and '.join(phrases)}{joiner}{bg}"


def caption_in_form(spec: SceneSpec, form: str, rng: np.random.Generator | None = None) -> str:
    """The caption of ``spec`` in one named form of :data:`CAPTION_FORMS` ("synonym" draws its
    words with ``rng``, or takes each shape's first synonym when ``rng`` is None)."""
    if form == "full":
        return caption_for(spec)
    if form == "no_size":
        return compose_caption(spec, size=False)
    if form == "synonym":
        shapes, sizes = [], []
        for obj in spec.objects:
            shape_choices = SHAPE_SYNONYMS[obj.shape] or (obj.shape,)
            size_choices = SIZE_SYNONYMS[obj.size]
            if rng is None:
                shapes.append(shape_choices[0])
                sizes.append(size_choices[0])
            else:
                shapes.append(shape_choices[int(rng.integers(len(shape_choices)))])
                sizes.append(size_choices[int(rng.integers(len(size_choices)))])
        return compose_caption(spec, shape_words=tuple(shapes), size_words=tuple(sizes))
    if form == "short":
        return compose_caption(spec, size=False, background="short")
    if form == "comma":
        return compose_caption(spec, size=False, articles=False, comma=True)
    if form == "plain_word":
        return compose_caption(spec, size=False, background="plain_word")
    raise ValueError(f"caption form must be one of {CAPTION_FORMS}, got {form!r}")


def relaxed_caption(spec: SceneSpec, rng: np.random.Generator) -> str:
    """A random relaxed caption of ``spec`` (training): each relaxation drawn independently, so
    combinations ("red disc, plain blue background") occur too. Never returns a full-grammar
    caption unless every draw keeps the grammar's choice."""
    size = rng.uniform() < 0.3
    shapes, sizes = [], []
    for obj in spec.objects:
        choices = (obj.shape, *SHAPE_SYNONYMS[obj.shape])
        shapes.append(choices[int(rng.integers(len(choices)))] if rng.uniform() < 0.4 else obj.shape)
        size_choices = (obj.size, *SIZE_SYNONYMS[obj.size])
        sizes.append(size_choices[int(rng.integers(len(size_choices)))])
    background = ("full", "plain_word", "short")[int(rng.integers(3))]
    comma = rng.uniform() < 0.25
    articles = not comma or rng.uniform() < 0.3
    if comma and background == "short":
        background = "full"
    return compose_caption(spec, size=size, shape_words=tuple(shapes), size_words=tuple(sizes),
                           background=background, articles=articles, comma=comma)


def _alternation(words: tuple[str, ...] | list[str]) -> str:
    return "(" + "|".join(sorted(words, key=len, reverse=True)) + ")"


_CANONICAL_SHAPE = {s: s for s in SHAPES} | {syn: s for s, syns in SHAPE_SYNONYMS.items() for syn in syns}
_CANONICAL_SIZE = {s: s for s in SIZES} | {syn: s for s, syns in SIZE_SYNONYMS.items() for syn in syns}
_LOOSE_OBJECT = (rf"(?:(?:an?|the) )?(?:{_alternation(list(_CANONICAL_SIZE))} )?{_COLOUR} "
                 rf"{_alternation(list(_CANONICAL_SHAPE))}")
_LOOSE_CAPTION = re.compile(rf"^{_LOOSE_OBJECT}(?: and {_LOOSE_OBJECT})?(?: on |, ?)(?:(?:an?|the) )?(.+)$")
_LOOSE_BACKGROUNDS = [
    ("plain", re.compile(rf"^(?:plain )?{_COLOUR}(?: background)?$")),
    ("gradient", re.compile(rf"^{_COLOUR} to {_COLOUR} gradient(?: background)?$")),
    ("stripes", re.compile(rf"^{_COLOUR} and {_COLOUR} (?:striped background|stripes)$")),
    ("checks", re.compile(rf"^{_COLOUR} and {_COLOUR} (?:checkered background|checks)$")),
]


def parse_prompt(prompt: str) -> ParsedCaption | None:
    """Read a prompt in the grammar or one of its relaxed forms (:data:`CAPTION_FORMS`, and their
    combinations); None when it is neither.

    Case, surrounding spaces, repeated spaces and a final full stop are ignored; synonyms are
    mapped to the grammar's words (disc/disk/ball -> circle, box/block -> square, big -> large,
    little -> small); an object without a size word gets ``size=None``. Unlike
    :func:`parse_caption` this never raises: it answers whether the bundled model was trained on
    prompts like this one.
    """
    text = " ".join(prompt.lower().split()).rstrip(".").strip()
    match = _LOOSE_CAPTION.match(text)
    if match is None:
        return None
    groups = match.groups()
    objects = [CaptionObject(_CANONICAL_SIZE.get(groups[0]), groups[1], _CANONICAL_SHAPE[groups[2]])]  # type: ignore[arg-type]
    if groups[4] is not None:
        objects.append(CaptionObject(_CANONICAL_SIZE.get(groups[3]), groups[4], _CANONICAL_SHAPE[groups[5]]))  # type: ignore[arg-type]
    for kind, pattern in _LOOSE_BACKGROUNDS:
        bg = pattern.match(groups[6])
        if bg is not None:
            return ParsedCaption(kind, tuple(bg.groups()), tuple(objects))
    return None


def prompt_form(prompt: str) -> PromptForm:
    """``prompt``'s form in the ``shapes-world`` caption grammar: ``"grammar"`` for a caption of the
    grammar itself, ``"relaxed"`` for one of its relaxed forms (:func:`parse_prompt` reads it),
    ``"outside"`` otherwise. The engine reaches it through the ``gnr_fast.caption_grammars`` entry
    point ``shapes-world`` (pyproject.toml)."""
    if is_grammar_caption(prompt):
        return "grammar"
    return "relaxed" if parse_prompt(prompt) is not None else "outside"
