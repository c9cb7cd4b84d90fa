"""Inversion of a real image into the source trajectory z*_0 … z*_N by the sampler's inversion steps
(DDIM: DESIGN.md §2; a consistency model's forward jumps: :mod:`gnr_fast.samplers.consistency`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .errors import InputError, InversionMismatchError
from .images import PreparedImage, encode_latent
from .loading import Components
from .precision import dtype_name
from .runtime.executor import UNetExecutor
from .samplers import Sampler
from .samplers.ddim import DDIMSampler
from .schedules import timestep_tensors

logger = logging.getLogger(__name__)

FORMAT = "gnr-fast-inversion"
FORMAT_VERSION = "1"


@dataclass
class Inversion:
    """A source trajectory and what is needed to reuse it for edits of the same image.

    ``latents[0]`` is the encoded image, ``latents[num_steps]`` the start latent of editing.
    """

    latents: torch.Tensor  # [num_steps + 1, 1, 4, h, w]
    source_prompt: str
    num_steps: int
    model_id: str
    original_size: tuple[int, int]  # (width, height) of the input image
    working_size: tuple[int, int]  # (width, height) the model ran at
    content_hash: str  # sha256 of the input's RGB pixels
    model_dtype: str | None = None
    """Dtype the model ran in while inverting ("float32", "float16", "bfloat16"); None if not recorded."""
    source_cache: Any = field(default=None, repr=False, compare=False)
    """In-memory :class:`~gnr_fast.fast.SourceCache` filled by fast edits (not saved to disk)."""
    pixel_stats: tuple[float, float] | None = None
    """(mean, population std) of the input's uint8 pixels, for samplers that colour-match their output
    to the input (consistency models); None otherwise."""

    def check_compatible(
        self,
        model_id: str,
        num_steps: int | None = None,
        dtype: torch.dtype | None = None,
        allow_dtype_mismatch: bool = True,
    ) -> None:
        """Raise :class:`InversionMismatchError` unless this inversion fits ``model_id`` and ``num_steps``.

        The model id does not depend on the dtype the model runs in (docs/precision.md §5). An
        inversion computed in another ``dtype`` is accepted with a warning naming both dtypes when
        ``allow_dtype_mismatch`` (the policy's default; the trajectory is stored in float32), and
        refused naming both otherwise.
        """
        if self.model_id != model_id:
            raise InversionMismatchError(
                f"this inversion was computed with model {self.model_id}, but the editor runs model {model_id}; "
                "invert the image again with this model"
            )
        if num_steps is not None and num_steps != self.num_steps:
            raise InversionMismatchError(
                f"this inversion has {self.num_steps} steps but the edit asks for {num_steps}; invert again with "
                f"num_steps={num_steps} or edit with {self.num_steps} steps"
            )
        wanted = None if dtype is None else dtype_name(dtype)
        if wanted is None or self.model_dtype is None or self.model_dtype == wanted:
            return
        if not allow_dtype_mismatch:
            raise InversionMismatchError(
                f"this inversion was computed in {self.model_dtype} but the editor runs in {wanted}; invert again in "
                f"{wanted}, or allow the mismatch (PrecisionPolicy(allow_dtype_mismatch=True))"
            )
        logger.warning(
            "editing an inversion computed in %s with the model in %s (same weights; the trajectories differ by "
            "rounding)", self.model_dtype, wanted,
        )

    def save(self, path: str | Path) -> Path:
        """Write the trajectory (safetensors) with its metadata (JSON strings in the header)."""
        path = Path(path)
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source_prompt": self.source_prompt,
            "num_steps": str(self.num_steps),
            "model_id": self.model_id,
            "original_size": json.dumps(list(self.original_size)),
            "working_size": json.dumps(list(self.working_size)),
            "content_hash": self.content_hash,
        }
        if self.model_dtype is not None:
            metadata["model_dtype"] = self.model_dtype
        if self.pixel_stats is not None:
            metadata["pixel_stats"] = json.dumps(list(self.pixel_stats))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": self.latents.detach().to("cpu", torch.float32).contiguous()}, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Inversion:
        """Read an inversion written by :meth:`save`; raises :class:`InputError` for anything else.

        The file is untrusted: its header (tensor names, dtype, shape, metadata) is checked before
        the tensor is read, the metadata must agree with the tensor and the resize policy, and the
        latents must be finite float32 values.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"inversion file {str(path)!r} does not exist")
        what = repr(str(path))
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                names = set(handle.keys())
                if metadata.get("format") != FORMAT or names != {"latents"}:
                    raise InputError(f"{what} is not a gnr-fast inversion file (write one with `gnr-fast invert`)")
                if metadata.get("version") != FORMAT_VERSION:
                    raise InputError(
                        f"{what} has inversion format version {metadata.get('version')!r}, but this gnr-fast reads "
                        f"version {FORMAT_VERSION!r}; invert the image again with `gnr-fast invert`"
                    )
                fields = _metadata_fields(metadata, what)
                _check_latents_header(handle.get_slice("latents"), fields, what)
            latents = load_file(str(path), device=str(device))["latents"]
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{what} is not a gnr-fast inversion file: {exc}") from exc
        if not torch.isfinite(latents).all():
            raise InputError(f"{what} is corrupt: its latents are not finite floats (NaN or infinite values); invert the image again")
        return cls(latents=latents, **fields)


def _metadata_fields(metadata: dict[str, str], what: str) -> dict[str, Any]:
    """The constructor fields of an inversion file's metadata; :class:`InputError` when one is
    missing or malformed, or the working size is not the resize policy's for the original size."""
    from .images import working_size

    missing = sorted({"source_prompt", "num_steps", "model_id", "original_size", "working_size", "content_hash"} - set(metadata))
    if missing:
        raise InputError(f"{what} is corrupt: its metadata lacks {missing}; invert the image again")
    if not metadata["num_steps"].isdigit() or not 1 <= int(metadata["num_steps"]) <= 10_000:
        raise InputError(f"{what} is corrupt: num_steps {metadata['num_steps']!r} is not a step count; invert the image again")
    sizes = {}
    for name in ("original_size", "working_size"):
        try:
            size = json.loads(metadata[name])
        except json.JSONDecodeError:
            size = None
        if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
            raise InputError(f"{what} is corrupt: {name} {metadata[name]!r} is not [width, height]; invert the image again")
        sizes[name] = tuple(size)
    if working_size(*sizes["original_size"]) != sizes["working_size"]:
        raise InputError(
            f"{what} is corrupt: working_size {list(sizes['working_size'])} is not the working size of an "
            f"image of {list(sizes['original_size'])}; invert the image again"
        )
    stats = None
    if "pixel_stats" in metadata:
        try:
            stats = json.loads(metadata["pixel_stats"])
        except json.JSONDecodeError:
            stats = None
        if not (isinstance(stats, list) and len(stats) == 2 and all(isinstance(v, (int, float)) for v in stats)):
            raise InputError(f"{what} is corrupt: pixel_stats {metadata['pixel_stats']!r} is not [mean, std]; invert the image again")
        stats = (float(stats[0]), float(stats[1]))
    return {
        "source_prompt": metadata["source_prompt"], "num_steps": int(metadata["num_steps"]),
        "model_id": metadata["model_id"], "content_hash": metadata["content_hash"],
        "model_dtype": metadata.get("model_dtype"), "pixel_stats": stats, **sizes,
    }


def _check_latents_header(latents, fields: dict[str, Any], what: str) -> None:
    """The latents tensor (not yet read) is float32 [num_steps + 1, 1, 4, h, w] with (w, h) dividing the
    working size by one factor (the VAE's; 8 for Stable Diffusion)."""
    width, height = fields["working_size"]
    shape = list(latents.get_shape())
    ok = (
        latents.get_dtype() == "F32"
        and len(shape) == 5
        and shape[0] == fields["num_steps"] + 1
        and shape[1] == 1
        and shape[2] == 4  # SD 1.x/2.x latents
        and shape[3] > 0 and shape[4] > 0
        and width % shape[4] == 0 and height % shape[3] == 0
        and width // shape[4] == height // shape[3]
    )
    if not ok:
        raise InputError(
            f"{what} is corrupt: latents {latents.get_dtype()} {shape} does not fit; expected F32 "
            f"[{fields['num_steps'] + 1}, 1, 4, h, w] for {fields['num_steps']} steps of a {width}x{height} image "
            "(the working size a multiple of (w, h)); invert the image again"
        )


def invert_many(
    components: Components,
    runner: UNetExecutor,
    images: Sequence[PreparedImage],
    source_prompts: Sequence[str],
    c_srcs: Sequence[torch.Tensor],
    num_steps: int = 50,
    progress: bool = True,
    sampler: Sampler | None = None,
) -> list[Inversion]:
    """Invert each image with its source prompt embedding (no guidance), in order.

    ``sampler`` (None: DDIM with ``num_steps`` steps) names the steps: for DDIM, for i = 0 … N−1 with
    t = timesteps[N−1−i]: ε = ε(z*_i, t, c_src), then the upward DDIM step from level t to
    t + stride; for a consistency model its forward jumps from the noised start. Images of one
    working size share every UNet call (one row each); each result equals the image's inversion on
    its own up to float rounding.
    """
    if sampler is None:
        sampler = DDIMSampler(components.schedule, num_steps)
    if not (len(images) == len(source_prompts) == len(c_srcs)):
        raise ValueError("invert_many needs one source prompt and one embedding per image")
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.working_size, []).append(index)
    results: list[Inversion | None] = [None] * len(images)
    for rows in by_size.values():
        trajectory = _invert_rows(
            components, runner, torch.cat([images[i].pixels for i in rows]), torch.cat([c_srcs[i] for i in rows]),
            sampler, progress,
        )  # [N+1, B, 4, h, w]
        for row, index in enumerate(rows):
            image = images[index]
            results[index] = Inversion(
                latents=trajectory[:, row : row + 1].clone(),
                source_prompt=source_prompts[index],
                num_steps=sampler.num_steps,
                model_id=components.model_id,
                original_size=image.original_size,
                working_size=image.working_size,
                content_hash=image.content_hash,
                model_dtype=dtype_name(components.dtype),
                pixel_stats=pixel_stats(image),
            )
    return results


def pixel_stats(image: PreparedImage) -> tuple[float, float]:
    """(mean, population std) of the image's uint8 pixels at the working size (over all pixels and
    channels), as the consistency models' colour matching reads them (README_consistency.md §8)."""
    pixels = ((image.pixels[0].permute(1, 2, 0).float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    array = pixels.numpy()
    return float(array.mean()), float(array.std())


def _invert_rows(
    components: Components,
    runner: UNetExecutor,
    pixels: torch.Tensor,
    c: torch.Tensor,
    sampler: Sampler,
    progress: bool,
) -> torch.Tensor:
    """The inversion trajectory [N+1, B, 4, h, w] (float32) of ``pixels`` [B, 3, H, W] under ``c`` [B, 77, D]:
    [z_0 (the encoded image), the latent after each of the sampler's inversion steps].

    Plain UNet calls (one per step, timesteps as tensors, guidance scale 0 for a UNet that embeds
    one); the latents and the update stay in float32 whatever the model dtype (the UNet casts at
    its input and output).
    """
    timesteps = list(sampler.inversion_timesteps)
    t_tensors = timestep_tensors(timesteps, components.device)
    z0 = encode_latent(components.vae, pixels, components.scaling_factor).float()
    scales = sampler.guidance_scales(None, 0, [False] * z0.shape[0])
    z = sampler.inversion_start(z0)
    trajectory = [z0]
    with torch.no_grad():
        for t, t_tensor in zip(tqdm(timesteps, desc="Inversion", disable=not progress, leave=False), t_tensors):
            eps = runner.plain(z, t_tensor, c, scales)
            z = sampler.invert_step(z, eps, t)  # DDIM step up (DESIGN.md §2), or a forward consistency jump
            trajectory.append(z)
    return torch.stack(trajectory)
