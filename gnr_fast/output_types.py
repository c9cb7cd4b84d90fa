"""The four output types of an edit, as diffusers names them: ``"pil"``, ``"np"``, ``"pt"``, ``"latent"``.

``"pil"`` (the default) is the edited image at the input's size; ``"np"`` and ``"pt"`` are the very
same pixels as float32 in [0, 1] (``uint8 / 255``: the decode truncates to 8 bits as the reference
does, then the image is resized back to the input's size), ``[H, W, 3]`` and ``[3, H, W]``; with
``"latent"`` the VAE decode is skipped and only the final latent ``[1, 4, h, w]`` is returned. A
pipeline stacks its images as diffusers does: a list of PIL images, ``[B, H, W, 3]``,
``[B, 3, H, W]`` or ``[B, 4, h, w]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import numpy as np
import torch
from PIL import Image

from .errors import InputError

OutputType = Literal["pil", "np", "pt", "latent"]
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")

OutputImage = Union[Image.Image, np.ndarray, torch.Tensor]
"""One edit's output in one of the decoded types (``"latent"`` outputs are the result's ``latents``)."""


def check_output_type(output_type: object) -> None:
    """Raise :class:`InputError` unless ``output_type`` is one of :data:`OUTPUT_TYPES`."""
    if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def decodes(output_type: OutputType) -> bool:
    """Whether ``output_type`` needs the VAE decode (every type but ``"latent"``)."""
    return output_type != "latent"


def convert_image(image: Image.Image, output_type: OutputType) -> OutputImage:
    """``image`` (RGB) as ``output_type``: itself, or its pixels / 255 as float32 ``[H, W, 3]`` / ``[3, H, W]``."""
    if output_type == "pil":
        return image
    array = np.asarray(image, dtype=np.float32) / np.float32(255)  # [H, W, 3]
    return array if output_type == "np" else torch.from_numpy(array).permute(2, 0, 1).contiguous()


def stack_outputs(outputs: Sequence[OutputImage], output_type: OutputType) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """Several edits' outputs (latents for ``"latent"``) batched as diffusers pipelines return them."""
    if output_type == "pil":
        return list(outputs)
    if output_type == "np":
        return np.stack(outputs)
    return torch.cat(list(outputs)) if output_type == "latent" else torch.stack(list(outputs))
