"""The public entry point: :class:`Editor` loads a checkpoint, inverts images and edits them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from PIL import Image

from .attention import install_capture_processors
from .config import EditConfig
from .editing import EditContext, StepCallback, run_edit_loop
from .fast.source_cache import CacheKey, SourceCache
from .fast.step import fast_step, source_sites
from .errors import ConfigError, InputError
from .images import DEFAULT_MAX_PIXELS, ImageInput, PreparedImage, decode_latent, prepare_image, to_output_image
from .inversion import Inversion, invert_many
from .loading import Components, load_components
from .prompts import check_prompt, encode_prompt
from .runtime.eager import EagerUNetRunner

logger = logging.getLogger(__name__)

Mode = Literal["fast", "reference"]
MODES = ("fast", "reference")


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
    """An edited image with the final latent, the inversion it came from, and timings."""

    image: Image.Image
    latents: torch.Tensor  # [1, 4, h, w] final latent
    inversion: Inversion
    timings: Timings
    unet_calls: int = 0
    config: EditConfig | None = field(default=None, repr=False)


class Editor:
    """Guide-and-Rescale editing with one loaded Stable Diffusion 1.x/2.x checkpoint."""

    def __init__(
        self,
        components: Components,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        source_cache_mb: float = 2048,
        source_cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.components = components
        self.max_pixels = max_pixels
        self.source_cache_bytes = int(source_cache_mb * 1024**2)
        self.source_cache_dtype = source_cache_dtype or components.dtype
        self.self_attn_layers = install_capture_processors(components.unet)
        self.runner = EagerUNetRunner(components.unet)
        self._embeddings: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        source_cache_mb: float = 2048,
        source_cache_dtype: torch.dtype | None = None,
        prediction_type: str | None = None,
        config: str | Path | None = None,
    ) -> "Editor":
        """Load a local diffusers SD 1.x/2.x folder or single-file checkpoint (``None``: the bundled model).

        Never contacts a hub. A ``.safetensors``/``.ckpt`` file is detected as SD 1.x or 2.x and loaded
        with shipped configs; ``prediction_type`` ('epsilon' | 'v_prediction') overrides the detected
        or configured one, ``config`` names a folder of diffusers configs for other architectures
        (README, "Single-file checkpoints").
        ``source_cache_mb`` bounds the source-pass internals a fast edit keeps with an inversion
        (0 disables the cache); ``source_cache_dtype`` stores them in another dtype (e.g. float16).
        """
        return cls(
            load_components(path, device=device, dtype=dtype, prediction_type=prediction_type, config=config),
            max_pixels=max_pixels,
            source_cache_mb=source_cache_mb,
            source_cache_dtype=source_cache_dtype,
        )

    @property
    def model_id(self) -> str:
        return self.components.model_id

    def embed(self, prompt: str) -> torch.Tensor:
        """CLIP embedding of ``prompt`` ([1, 77, C]); repeated prompts are served from a small cache."""
        if prompt not in self._embeddings:
            if len(self._embeddings) > 64:
                self._embeddings.clear()
            self._embeddings[prompt] = encode_prompt(self.components, prompt)
        return self._embeddings[prompt]

    def invert(self, image: ImageInput, source_prompt: str, num_steps: int = 50, progress: bool = True) -> Inversion:
        """DDIM-invert ``image`` with ``source_prompt`` (DESIGN.md §2)."""
        check_prompt(source_prompt, "source_prompt")
        _check_steps(num_steps)
        prepared = prepare_image(image, max_pixels=self.max_pixels)
        return self.invert_prepared([prepared], [source_prompt], num_steps, progress)[0]

    def invert_prepared(
        self, images: Sequence[PreparedImage], source_prompts: Sequence[str], num_steps: int, progress: bool = False
    ) -> list[Inversion]:
        """DDIM-invert already prepared and validated images, in order; images of one working size
        share every UNet call (``inversion.invert_many``)."""
        embeddings = [self.embed(prompt) for prompt in source_prompts]
        return invert_many(self.components, self.runner, images, source_prompts, embeddings, num_steps, progress)

    def resolve_config(self, preset: str = "nonstyle", config: EditConfig | str | Path | None = None, num_steps: int | None = None) -> EditConfig:
        """The config an edit runs: ``config`` (object or YAML path) if given, else the named preset."""
        if config is None:
            return EditConfig.preset(preset, 50 if num_steps is None else num_steps)
        if isinstance(config, (str, Path)):
            config = EditConfig.from_yaml(config)
        if not isinstance(config, EditConfig):
            raise ConfigError(f"config must be an EditConfig or a YAML path, got {type(config).__name__}")
        if num_steps is not None and num_steps != config.num_steps:
            config = config.with_steps(num_steps)
        return config

    def edit(
        self,
        image_or_inversion: ImageInput | Inversion,
        target_prompt: str,
        source_prompt: str | None = None,
        preset: str = "nonstyle",
        config: EditConfig | str | Path | None = None,
        mode: Mode = "fast",
        progress: bool = True,
        num_steps: int | None = None,
        callback: StepCallback | None = None,
    ) -> EditResult:
        """Edit an image (or a saved inversion of one) toward ``target_prompt``.

        With an image, ``source_prompt`` is required and the image is inverted first; with an
        :class:`Inversion`, its source prompt is used (a different ``source_prompt`` is an error).
        ``mode="fast"`` runs the planned passes (and fills/uses the inversion's source cache);
        ``mode="reference"`` runs the paper-literal four passes per step. Both give the same edit
        within the golden tolerances.
        """
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        check_prompt(target_prompt, "target_prompt")
        if num_steps is not None:
            _check_steps(num_steps)
        timings = Timings()
        if isinstance(image_or_inversion, Inversion):
            inversion = image_or_inversion
            if source_prompt is not None and source_prompt != inversion.source_prompt:
                raise InputError(
                    f"source_prompt {source_prompt!r} differs from the inversion's {inversion.source_prompt!r}; "
                    "omit source_prompt or invert again"
                )
            cfg = self.resolve_config(preset, config, inversion.num_steps if num_steps is None else num_steps)
            inversion.check_compatible(self.model_id, cfg.num_steps)
        else:
            if source_prompt is None:
                raise InputError("source_prompt is required when editing an image (it describes the input image)")
            cfg = self.resolve_config(preset, config, num_steps)
            start = time.perf_counter()
            inversion = self.invert(image_or_inversion, source_prompt, num_steps=cfg.num_steps, progress=progress)
            timings.inversion_s = time.perf_counter() - start
        calls_before = self.runner.calls
        start = time.perf_counter()
        ctx = EditContext.build(
            self.components,
            self.runner,
            cfg,
            self.self_attn_layers,
            c_uncond=self.embed(""),
            c_src=self.embed(inversion.source_prompt),
            c_trg=self.embed(target_prompt),
        )
        latents = inversion.latents.to(self.components.device, self.components.dtype)
        if mode == "fast":
            ctx.source_cache = self._source_cache(inversion, ctx)
            step_fn = fast_step
        else:
            from .reference.step import reference_step

            step_fn = reference_step
        final = run_edit_loop(ctx, step_fn, latents, progress=progress, callback=callback)
        timings.editing_s = time.perf_counter() - start
        start = time.perf_counter()
        image = to_output_image(decode_latent(self.components.vae, final, self.components.scaling_factor)[0], inversion.original_size)
        timings.decoding_s = time.perf_counter() - start
        return EditResult(
            image=image,
            latents=final.detach(),
            inversion=inversion,
            timings=timings,
            unet_calls=self.runner.calls - calls_before,
            config=cfg,
        )


    def _source_cache(self, inversion: Inversion, ctx: EditContext) -> SourceCache | None:
        """The inversion's source cache for this edit's pairing/layers (a fresh one if they changed)."""
        if self.source_cache_bytes <= 0:
            return None
        fresh = self.new_source_cache(ctx)
        if inversion.source_cache is None or inversion.source_cache.key != fresh.key:
            inversion.source_cache = fresh
        return inversion.source_cache

    def new_source_cache(self, ctx: EditContext) -> SourceCache:
        """An empty source cache for edits with ``ctx``'s pairing, layers, feature sites and steps,
        bounded by this editor's ``source_cache_mb`` and stored in its ``source_cache_dtype``."""
        key = CacheKey(ctx.config.align_inversion, ctx.layers, source_sites(ctx), ctx.config.num_steps)
        return SourceCache(key, max_bytes=self.source_cache_bytes, storage_dtype=self.source_cache_dtype)

    def edit_batch(self, requests: list, progress: bool = False) -> list[EditResult]:
        """Run several edits at once; compatible ones share UNet calls (see :mod:`gnr_fast.batch`)."""
        from .batch import edit_batch

        return edit_batch(self, requests, progress=progress)

    def edit_many(
        self,
        inversion: Inversion,
        target_prompts: list[str],
        preset: str = "nonstyle",
        config: EditConfig | str | Path | None = None,
        mode: Mode = "fast",
        progress: bool = True,
    ) -> list[EditResult]:
        """Edit one inversion toward several targets; the source pass runs once and is reused."""
        if isinstance(target_prompts, str) or not target_prompts:
            raise InputError("target_prompts must be a non-empty list of prompts")
        return [
            self.edit(inversion, target, preset=preset, config=config, mode=mode, progress=progress)
            for target in target_prompts
        ]


def _check_steps(num_steps: object) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= 1000:
        raise InputError(f"num_steps must be an integer in [1, 1000], got {num_steps!r}")
