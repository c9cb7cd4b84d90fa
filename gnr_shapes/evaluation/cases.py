"""Held-out edit cases in the shapes world: a source scene and the same scene with one attribute changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..world import COLOUR_NAMES, SHAPES, Scene, generate_scene, render

EditKind = Literal["colour", "shape", "background"]
EDIT_KINDS: tuple[EditKind, ...] = ("colour", "shape", "background")
HELD_OUT_SEED = 9_000_000
"""Evaluation seeds start here, far from the training seeds (which start at 0)."""


@dataclass(frozen=True)
class EditCase:
    """One benchmark edit: prompts, the true source and target scenes, and the region that may change."""

    kind: EditKind
    seed: int
    source: Scene
    target: Scene
    change_mask: np.ndarray  # bool [H, W]: pixels the edit is expected to change (dilated)

    @property
    def keep_mask(self) -> np.ndarray:
        """Pixels that should stay as they are."""
        return ~self.change_mask


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _other(rng: np.random.Generator, options: tuple[str, ...], exclude: set[str]) -> str:
    choices = [o for o in options if o not in exclude]
    return str(choices[rng.integers(len(choices))])


def make_case(kind: EditKind, seed: int, size: int = 128, margin: int = 2) -> EditCase:
    """The edit case of ``kind`` for scene ``seed`` (deterministic).

    colour: the main object's colour changes; shape: its shape changes; background: a plain
    background changes colour. ``change_mask`` is the changed region dilated by ``margin`` pixels,
    so that anti-aliased borders count as changeable.
    """
    rng = np.random.default_rng(seed)
    # Background edits use plain backgrounds so that "the background" is one colour to change.
    weights = {"plain": 1.0} if kind == "background" else None
    source = generate_scene(seed, size=size, background_weights=weights)
    spec = source.spec
    main = spec.objects[0]
    used = set(spec.background.colours) | {o.colour for o in spec.objects}
    if kind == "colour":
        target_spec = spec.with_object(0, colour=_other(rng, COLOUR_NAMES, used))
    elif kind == "shape":
        target_spec = spec.with_object(0, shape=_other(rng, SHAPES, {main.shape}))
    else:
        target_spec = spec.with_background("plain", (_other(rng, COLOUR_NAMES, used),))
    target = render(target_spec, size=size)
    if kind == "background":
        change = _dilate(~np.any(source.masks, axis=0), margin)  # object borders blend the background
    else:
        change = _dilate(source.masks[0] | target.masks[0], margin)
    return EditCase(kind=kind, seed=seed, source=source, target=target, change_mask=change)


def make_cases(kind: EditKind, count: int, size: int = 128, first_seed: int = HELD_OUT_SEED) -> list[EditCase]:
    """``count`` held-out cases of ``kind`` (seeds ``first_seed``, ``first_seed + 1``, …)."""
    return [make_case(kind, first_seed + i, size=size) for i in range(count)]
