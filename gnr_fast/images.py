"""Image input/output: reading, normalising, the resize policy, and the VAE encode/decode.

Resize policy (documented in the README): an image whose sides are both multiples of 64 is used
as it is. Otherwise each side is rounded to the nearest multiple of 64 (at least 64), the image is
resized to that working size with Lanczos filtering, edited, and the result is resized back to the
input's size. RGBA images are composited over white; greyscale and palette images become RGB;
EXIF orientation is applied first.

Encoded images are untrusted input (the server decodes what clients send). Decoding refuses,
with an :class:`~gnr_fast.errors.InputError`, before any pixel is decoded: formats other than
PNG, JPEG and WebP (:data:`DECODED_FORMATS`; no other PIL decoder runs) and a header declaring
more than ``max_pixels`` pixels (a decompression bomb: a small file declaring 30000×30000).
Truncated or corrupt files and oversized metadata chunks (PIL's text-chunk limits) are refused
while decoding. Of an animated or multi-frame file (APNG, animated WebP, MPO) the first frame is
used, as PIL opens it.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, NonFiniteError
from .precision import dtype_name, to_compute

logger = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image, np.ndarray, bytes]

SIZE_MULTIPLE = 64
"""Sides must be multiples of 64 so that the latent (÷8) survives the UNet's three downsamplings."""

MIN_SIDE = 64
DEFAULT_MAX_PIXELS = 1024 * 1024
"""Default upper bound on width × height; pass ``max_pixels`` to raise it."""

DECODED_FORMATS = ("PNG", "JPEG", "WEBP")
"""The only formats an encoded image is decoded from (PIL tries no other plugin)."""


@dataclass(frozen=True)
class PreparedImage:
    """An RGB image ready for the VAE, with what is needed to undo the resize."""

    pixels: torch.Tensor  # [1, 3, H, W] float32 in [-1, 1] at the working size
    original_size: tuple[int, int]  # (width, height) of the input
    working_size: tuple[int, int]  # (width, height) the model sees
    content_hash: str  # sha256 of the RGB pixels at the original size

    @property
    def resized(self) -> bool:
        return self.original_size != self.working_size


def read_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return ``image`` as an RGB PIL image (EXIF orientation applied, alpha composited over white).

    An encoded image (path or bytes) whose header declares more than ``max_pixels`` pixels is
    refused before it is decoded (see the module docstring for what else decoding refuses).
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file {str(path)!r} does not exist")
        pil = _decode(path, f"image {str(path)!r}", max_pixels)
    elif isinstance(image, bytes):
        pil = _decode(io.BytesIO(image), f"image bytes ({len(image)} bytes)", max_pixels)
    elif isinstance(image, Image.Image):
        pil = ImageOps.exif_transpose(image) or image
    elif isinstance(image, np.ndarray):
        pil = _array_to_pil(image)
    else:
        raise InputError(
            f"image must be a file path, PIL image, numpy array or encoded bytes, got {type(image).__name__}"
        )
    return to_rgb(pil)


def _decode(source, what: str, max_pixels: int) -> Image.Image:
    unreadable = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
    try:
        opened = Image.open(source, formats=DECODED_FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise InputError(f"cannot read {what}: not a PNG, JPEG or WebP file (other formats are refused)") from None
    except unreadable as exc:
        raise InputError(f"cannot read {what}: {exc}. Use a PNG, JPEG or WebP image.") from exc
    with opened:
        check_pixel_count(*opened.size, max_pixels)  # before a pixel is decoded
        try:
            return ImageOps.exif_transpose(opened)  # a loaded copy of the first frame, orientation applied
        except unreadable as exc:
            raise InputError(f"cannot read {what}: {exc}. Use a PNG, JPEG or WebP image.") from exc


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    """Raise :class:`InputError` when a ``width`` × ``height`` image exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise InputError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}; downscale it "
            "or raise max_pixels (Editor(max_pixels=...) / --max-pixels)"
        )


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(f"image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"image array must be uint8 or float in [0, 1], got dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise InputError("image array contains NaN or infinite values")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array)


def to_rgb(pil: Image.Image) -> Image.Image:
    """RGB version of ``pil``: alpha is composited over white, greyscale/palette are expanded."""
    if pil.mode == "RGB":
        return pil
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return pil.convert("RGB")


def working_size(width: int, height: int) -> tuple[int, int]:
    """The size the model runs at: each side rounded to the nearest multiple of 64 (≥ 64)."""

    def snap(side: int) -> int:
        return max(SIZE_MULTIPLE, int(round(side / SIZE_MULTIPLE)) * SIZE_MULTIPLE)

    return snap(width), snap(height)


def pixel_hash(rgb: np.ndarray) -> str:
    """sha256 of an RGB image's ``[H, W, 3]`` uint8 pixels and its size: an inversion's
    ``content_hash``, which the server's cache and the client's routing key share."""
    height, width = rgb.shape[:2]
    return hashlib.sha256(f"{width}x{height}".encode() + np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).hexdigest()


def prepare_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Read, validate and normalise ``image`` per the module's resize policy."""
    pil = read_image(image, max_pixels)
    width, height = pil.size
    if min(width, height) < MIN_SIDE:
        raise InputError(f"image is {width}x{height}; both sides must be at least {MIN_SIDE} pixels")
    check_pixel_count(width, height, max_pixels)
    rgb = np.asarray(pil, dtype=np.uint8)
    content_hash = pixel_hash(rgb)
    size = working_size(width, height)
    if size != (width, height):
        rgb = np.asarray(pil.resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)
    # The reference's uint8 / 127.5 − 1 (same float32 bits), in numpy: servers call this on request
    # threads, where a parallel torch op would start an OpenMP team beside the engine thread's and
    # slow every edit (gnr_fast.serving.service.EditService).
    pixels = torch.from_numpy(rgb.astype(np.float32) / np.float32(127.5) - np.float32(1.0))
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
    return PreparedImage(pixels=pixels, original_size=(width, height), working_size=size, content_hash=content_hash)


@torch.no_grad()
def encode_latent(vae, pixels: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """z = scaling_factor · VAE.encode(pixels).mean (DESIGN.md §1): [B, 4, H/8, W/8] in float32.

    Runs in the VAE's dtype; a non-finite result of a low-precision VAE is retried in float32,
    and one that is still not finite raises :class:`NonFiniteError` (docs/precision.md §4).
    """
    pixels = pixels.to(device=vae.device)
    mean = _finite_vae_output(vae, lambda m: m.encode(pixels.to(m.dtype)).latent_dist.mean, "encoding the image")
    return to_compute(mean) * scaling_factor


@torch.no_grad()
def decode_latent(vae, latent: torch.Tensor, scaling_factor: float) -> np.ndarray:
    """Decode latents to uint8 RGB arrays [B, H, W, 3] exactly as the reference does (truncating ×255).

    Runs in the VAE's dtype (float32 when its config says ``force_upcast``, see
    :meth:`~gnr_fast.precision.PrecisionPolicy.vae_dtype`); a non-finite decode of a low-precision
    VAE is retried in float32, and a latent or image that is still not finite raises
    :class:`NonFiniteError` — never a black image (docs/precision.md §4).
    """
    latent = to_compute(latent.detach())
    if not bool(torch.isfinite(latent).all()):
        raise NonFiniteError(
            "the latent to decode contains NaN or infinite values (the edit diverged); lower the guider scales, "
            "or run with dtype=torch.float32"
        )
    latent = latent / scaling_factor
    image = _finite_vae_output(vae, lambda m: m.decode(latent.to(m.dtype)).sample, "decoding the latent")
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    return (image.cpu().permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def _finite_vae_output(vae, run: Callable[[torch.nn.Module], torch.Tensor], what: str) -> torch.Tensor:
    """``run(vae)``, retried on a float32 copy of a low-precision ``vae`` when its output is not finite."""
    out = run(vae)
    if bool(torch.isfinite(out).all()):
        return out
    if vae.dtype in (torch.float32, torch.float64):
        raise NonFiniteError(
            f"the VAE produced NaN or infinite values {what} in {dtype_name(vae.dtype)}; check the checkpoint's VAE weights"
        )
    logger.warning(
        "the %s VAE produced non-finite values %s; retrying in float32 (load with vae_upcast='always' to skip the "
        "low-precision attempt)", dtype_name(vae.dtype), what,
    )
    out = run(copy.deepcopy(vae).to(torch.float32))
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(
            f"the VAE produced NaN or infinite values {what}, in {dtype_name(vae.dtype)} and again in float32; check the "
            "checkpoint's VAE weights and the input"
        )
    return out


def to_output_image(array: np.ndarray, original_size: tuple[int, int]) -> Image.Image:
    """PIL image of one decoded array, resized back to the input's size when the policy resized it."""
    pil = Image.fromarray(array)
    if pil.size != original_size:
        pil = pil.resize(original_size, Image.Resampling.LANCZOS)
    return pil
