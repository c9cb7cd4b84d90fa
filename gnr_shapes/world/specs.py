"""Scene specifications: the structured ground truth of a scene (background + objects), validated
against the palette. Rendered by :mod:`gnr_shapes.world.scenes`, captioned by :mod:`gnr_shapes.world.captions`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from gnr_fast.errors import InputError
from gnr_shapes.world.palette import BACKGROUND_KINDS, COLOUR_NAMES, COLOURS, SHAPES, SIZES


@dataclass(frozen=True)
class BackgroundSpec:
    """A background: its kind and colour names (one for plain, two otherwise)."""

    kind: str
    colours: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in BACKGROUND_KINDS:
            raise InputError(f"background kind {self.kind!r} is not one of {BACKGROUND_KINDS}")
        expected = 1 if self.kind == "plain" else 2
        if len(self.colours) != expected:
            raise InputError(
                f"background kind {self.kind!r} needs {expected} colour(s), got {self.colours!r}"
            )
        for colour in self.colours:
            if colour not in COLOURS:
                raise InputError(f"background colour {colour!r} is not one of {COLOUR_NAMES}")
        if expected == 2 and self.colours[0] == self.colours[1]:
            raise InputError(f"background colours must differ, got {self.colours!r}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object: shape, colour and size words plus its exact geometry.

    ``center`` is (x, y) and ``radius`` the half-extent, both as fractions of the image side.
    """

    shape: str
    colour: str
    size: str
    center: tuple[float, float]
    radius: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise InputError(f"object shape {self.shape!r} is not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise InputError(f"object colour {self.colour!r} is not one of {COLOUR_NAMES}")
        if self.size not in SIZES:
            raise InputError(f"object size {self.size!r} is not one of {SIZES}")
        if not 0.0 < self.radius < 0.5:
            raise InputError(f"object radius must be in (0, 0.5) of the side, got {self.radius}")


@dataclass(frozen=True)
class SceneSpec:
    """The full ground truth of a scene; ``objects[0]`` is the main (largest) object."""

    background: BackgroundSpec
    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise InputError(f"a scene has 1 or 2 objects, got {len(self.objects)}")

    def with_object(self, index: int, **changes: object) -> "SceneSpec":
        """Return a copy whose object ``index`` has the given fields replaced (same layout)."""
        if not 0 <= index < len(self.objects):
            raise InputError(f"object index {index} out of range for {len(self.objects)} objects")
        objects = list(self.objects)
        objects[index] = dataclasses.replace(objects[index], **changes)  # type: ignore[arg-type]
        return dataclasses.replace(self, objects=tuple(objects))

    def with_background(self, kind: str, colours: Sequence[str]) -> "SceneSpec":
        """Return a copy with the background replaced (objects unchanged)."""
        return dataclasses.replace(self, background=BackgroundSpec(kind, tuple(colours)))
