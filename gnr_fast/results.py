"""Result types of edits: the edited image with its latent, inversion, timings and UNet work."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .config import EditConfig
from .inversion import Inversion


@dataclass
class Timings:
    """Wall-clock seconds of the phases of one call (0 for phases that did not run)."""

    inversion_s: float = 0.0
    editing_s: float = 0.0
    decoding_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.inversion_s + self.editing_s + self.decoding_s


@dataclass
class EditResult:
    """An edited image with the final latent, the inversion it came from, and timings.

    ``unet_calls`` and ``unet_rows`` count the UNet calls and batch rows of the edit loop this
    edit ran in; ``batch_size`` is how many edits shared those calls (1 for an edit on its own).
    ``image`` is of the edit's ``output_type`` (:mod:`gnr_fast.output_types`; a PIL image by default,
    ``None`` for ``"latent"``). ``interrupted`` is true when a step callback stopped the edit early
    (diffusers' ``_interrupt``): then ``latents``/``image`` are the partial result after
    ``steps_done`` of the config's steps.
    """

    image: Image.Image | np.ndarray | torch.Tensor | None
    latents: torch.Tensor  # [1, 4, h, w] final latent, float32
    inversion: Inversion
    timings: Timings
    unet_calls: int = 0
    unet_rows: int = 0
    batch_size: int = 1
    config: EditConfig | None = field(default=None, repr=False)
    interrupted: bool = False
    steps_done: int | None = None  # steps run (None: every step of the config)
