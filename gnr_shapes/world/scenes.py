"""The scene renderer and the seeded scene sampler.

A :class:`~gnr_shapes.world.specs.SceneSpec` (re-exported here) is the structured ground truth
(background + objects). :func:`render` turns a spec into pixels, per-object masks and a caption;
it is a pure function of the spec, so an edited
spec (one object's colour or shape, or the background, changed) renders the same layout with only
that attribute different. :func:`generate_scene` samples a spec from a seed and renders it.

Geometry is resolution-independent: centres and radii are fractions of the image side. Objects
are anti-aliased by 4 x 4 supersampling; an object's mask is the set of pixels it covers at least
half of (after occlusion by later objects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from gnr_fast.errors import InputError
from gnr_shapes.world.captions import caption_for
from gnr_shapes.world.palette import (
    BACKGROUND_KINDS,
    CHECK_PERIOD_PER_128,
    COLOUR_NAMES,
    COLOURS,
    DEFAULT_BACKGROUND_WEIGHTS,
    SHAPES,
    SIZE_JITTER,
    SIZE_RADIUS,
    SIZES,
    STRIPE_PERIOD_PER_128,
)
from gnr_shapes.world.specs import BackgroundSpec, ObjectSpec, SceneSpec

__all__ = [
    "BackgroundSpec", "ObjectSpec", "Scene", "SceneSpec", "generate_images", "generate_scene", "object_coverage",
    "render", "render_background", "sample_spec",
]

# Supersampling factor per axis for anti-aliased edges (16 coverage levels per pixel).
_SUPERSAMPLE = 4
# Half-extent of each shape's bounding box, in units of the object radius: circles and squares
# stay within r, the triangle's apex sits at 1.25 r (see _inside).
_EXTENT = {"circle": 1.0, "square": 0.85, "triangle": 1.25}
# Margin kept between an object's bounding circle and the image border, as a fraction of the side.
_BORDER_MARGIN = 0.03
# Minimum gap between the bounding circles of two objects, as a fraction of the side.
_OBJECT_GAP = 0.04


@dataclass(frozen=True)
class Scene:
    """A rendered scene.

    ``image`` is uint8 [H, W, 3]; ``masks`` is bool [n_objects, H, W], one per object in spec
    order; ``caption`` is the grammar's sentence for ``spec``.
    """

    spec: SceneSpec
    image: np.ndarray
    masks: np.ndarray
    caption: str

    @property
    def objects(self) -> tuple[ObjectSpec, ...]:
        """The objects of the spec, main object first."""
        return self.spec.objects

    @property
    def background(self) -> BackgroundSpec:
        """The background of the spec."""
        return self.spec.background


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLOURS[name], dtype=np.float32)


def render_background(background: BackgroundSpec, size: int) -> np.ndarray:
    """Render a background as float32 [size, size, 3] in 0..255 (no anti-aliasing needed)."""
    first = _rgb(background.colours[0])
    if background.kind == "plain":
        return np.broadcast_to(first, (size, size, 3)).copy()
    second = _rgb(background.colours[1])
    rows = np.arange(size, dtype=np.float32)[:, None]
    cols = np.arange(size, dtype=np.float32)[None, :]
    if background.kind == "gradient":
        # Top row is the first colour, bottom row the second, linear in between.
        weight = np.broadcast_to(rows / max(size - 1, 1), (size, size))
    elif background.kind == "stripes":
        period = max(2, size * STRIPE_PERIOD_PER_128 // 128)
        weight = np.broadcast_to((cols // (period // 2)) % 2, (size, size)).astype(np.float32)
    else:  # checks
        period = max(2, size * CHECK_PERIOD_PER_128 // 128)
        half = period // 2
        weight = ((rows // half + cols // half) % 2).astype(np.float32)
    return first * (1.0 - weight[..., None]) + second * weight[..., None]


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean "point is inside" for offsets (dx, dy) from the centre, y pointing down."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = _EXTENT["square"] * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upward equilateral triangle inscribed in a circle of radius 1.25 r: apex at (0, -R), base
    # vertices at (+-R cos 30deg, R / 2). Inside = below both slanted edges and above the base.
    big_r = _EXTENT["triangle"] * radius
    base = dy <= big_r / 2.0
    # Edge from apex (0, -R) to (R*sqrt(3)/2, R/2) has slope sqrt(3): dy >= -R + sqrt(3) |dx|.
    slanted = dy >= -big_r + np.sqrt(3.0) * np.abs(dx)
    return base & slanted


def object_coverage(obj: ObjectSpec, size: int) -> np.ndarray:
    """Fraction of each pixel the object covers, float32 [size, size] in [0, 1]."""
    cx, cy = obj.center[0] * size, obj.center[1] * size
    radius = obj.radius * size
    reach = _EXTENT[obj.shape] * radius + 1.0
    x0, x1 = max(0, int(np.floor(cx - reach))), min(size, int(np.ceil(cx + reach)))
    y0, y1 = max(0, int(np.floor(cy - reach))), min(size, int(np.ceil(cy + reach)))
    coverage = np.zeros((size, size), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return coverage
    offsets = (np.arange(_SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + offsets[None, :]).reshape(-1) - cx
    ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + offsets[None, :]).reshape(-1) - cy
    inside = _inside(obj.shape, xs[None, :], ys[:, None], radius)  # [hs, ws]
    box = inside.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))
    coverage[y0:y1, x0:x1] = box
    return coverage


def render(spec: SceneSpec, size: int = 128) -> Scene:
    """Render ``spec`` at ``size`` x ``size`` pixels.

    Deterministic: the same spec always gives the same bytes. Objects are painted in spec order
    (later ones on top); each mask holds the pixels where that object's visible coverage >= 0.5.
    """
    if size < 16:
        raise InputError(f"size must be at least 16 pixels, got {size}")
    image = render_background(spec.background, size)
    coverages = [object_coverage(obj, size) for obj in spec.objects]
    visible = []
    for index, (obj, coverage) in enumerate(zip(spec.objects, coverages)):
        image = image * (1.0 - coverage[..., None]) + _rgb(obj.colour) * coverage[..., None]
        occluded = coverage.copy()
        for later in coverages[index + 1 :]:
            occluded *= 1.0 - later
        visible.append(occluded)
    masks = np.stack([v >= 0.5 for v in visible])
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(spec=spec, image=pixels, masks=masks, caption=caption_for(spec))


def _pick_other(rng: np.random.Generator, exclude: Sequence[str]) -> str:
    choices = [c for c in COLOUR_NAMES if c not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _place(
    rng: np.random.Generator, shape: str, radius: float, others: Sequence[tuple[float, float, float]]
) -> tuple[float, float] | None:
    """Sample a centre keeping the object inside the image and clear of ``others``.

    ``others`` holds (cx, cy, bounding radius); returns None after 100 failed tries.
    """
    reach = _EXTENT[shape] * radius
    low, high = reach + _BORDER_MARGIN, 1.0 - reach - _BORDER_MARGIN
    for _ in range(100):
        cx, cy = rng.uniform(low, high, size=2)
        if all(np.hypot(cx - ox, cy - oy) >= reach + orad + _OBJECT_GAP for ox, oy, orad in others):
            return float(cx), float(cy)
    return None


def sample_spec(
    rng: np.random.Generator,
    two_object_prob: float = 0.25,
    background_weights: Mapping[str, float] | None = None,
) -> SceneSpec:
    """Sample a scene spec from ``rng``.

    Two-object scenes have a large main object and a small second one, so ``objects[0]`` is
    always the largest. Object colours differ from each other and from every background colour.
    """
    weights = dict(background_weights or DEFAULT_BACKGROUND_WEIGHTS)
    kinds = [k for k in BACKGROUND_KINDS if weights.get(k, 0.0) > 0.0]
    if not kinds:
        raise InputError(f"background_weights has no positive weight: {weights!r}")
    probs = np.asarray([weights[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]
    first = _pick_other(rng, ())
    colours = (first,) if kind == "plain" else (first, _pick_other(rng, (first,)))
    background = BackgroundSpec(kind, colours)

    n_objects = 2 if rng.uniform() < two_object_prob else 1
    sizes = ["large", "small"] if n_objects == 2 else [SIZES[int(rng.integers(len(SIZES)))]]
    while True:
        used = list(colours)
        objects: list[ObjectSpec] = []
        placed: list[tuple[float, float, float]] = []
        for size_word in sizes:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = _pick_other(rng, used)
            used.append(colour)
            radius = SIZE_RADIUS[size_word] * float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
            center = _place(rng, shape, radius, placed)
            if center is None:
                break
            placed.append((center[0], center[1], _EXTENT[shape] * radius))
            objects.append(ObjectSpec(shape, colour, size_word, center, radius))
        if len(objects) == n_objects:
            return SceneSpec(background, tuple(objects))


def generate_scene(
    seed: int,
    size: int = 128,
    two_object_prob: float = 0.25,
    background_weights: Mapping[str, float] | None = None,
) -> Scene:
    """Sample and render the scene of ``seed``; the same arguments always give the same scene."""
    rng = np.random.default_rng(seed)
    return render(sample_spec(rng, two_object_prob, background_weights), size)


def generate_images(seeds: Sequence[int], size: int = 128, **kwargs: object) -> np.ndarray:
    """Render the scenes of ``seeds`` as one uint8 array [len(seeds), size, size, 3]."""
    return np.stack([generate_scene(int(s), size, **kwargs).image for s in seeds])  # type: ignore[arg-type]
