"""The named colours, shapes and sizes of the shapes world.

Everything here is a constant table; the names are the words captions use. Colours were chosen
by hand to be well separated in RGB (every pair differs by at least 70 in some channel), so a
slightly blurred VAE reconstruction still sits closest to its own colour.
"""

from __future__ import annotations

from typing import Final

# name -> RGB (uint8). Order fixes the class index the judge uses; never reorder, only append.
COLOURS: Final[dict[str, tuple[int, int, int]]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOUR_NAMES: Final[tuple[str, ...]] = tuple(COLOURS)

# Order fixes the judge's class index; never reorder, only append.
SHAPES: Final[tuple[str, ...]] = ("circle", "square", "triangle")

SIZES: Final[tuple[str, ...]] = ("small", "large")

# Object "radius" (half-extent of a circle) as a fraction of the image side. Large ~28 px and small
# ~15 px at 128 px: both cover several 8-pixel VAE latent cells, and with the +-10 % jitter below
# the two ranges never overlap, so the size word is unambiguous from the pixels.
SIZE_RADIUS: Final[dict[str, float]] = {"small": 0.12, "large": 0.22}
SIZE_JITTER: Final[float] = 0.10

# Order fixes the judge's class index; never reorder, only append.
BACKGROUND_KINDS: Final[tuple[str, ...]] = ("plain", "gradient", "stripes", "checks")

# Default sampling weights of the background kinds: mostly plain so a small model learns the
# world within about an hour of CPU training (see /work/shared/notes/toy-model-training.md).
DEFAULT_BACKGROUND_WEIGHTS: Final[dict[str, float]] = {
    "plain": 0.7,
    "gradient": 0.1,
    "stripes": 0.1,
    "checks": 0.1,
}

# Stripe and check periods in pixels per 128 px of image side (16 px stripes = two latent cells,
# 32 px checks = a 4 x 4 board); scaled with the image size.
STRIPE_PERIOD_PER_128: Final[int] = 16
CHECK_PERIOD_PER_128: Final[int] = 32
