"""Disjoint scene-seed ranges of the shapes world, so held-out numbers are honest.

Training scripts draw scenes from ``TRAIN_SEED_START`` upwards (at most ``TRAIN_SEED_COUNT``);
every evaluation (VAE PSNR, judge accuracy, text-to-image fidelity, inversion PSNR) draws from
``HELD_OUT_SEED_START`` upwards. The judge uses its own training range so it never sees the
scenes the generative model was trained on either.
"""

from typing import Final

TRAIN_SEED_START: Final[int] = 0
TRAIN_SEED_COUNT: Final[int] = 1_000_000
JUDGE_TRAIN_SEED_START: Final[int] = 5_000_000
HELD_OUT_SEED_START: Final[int] = 10_000_000
