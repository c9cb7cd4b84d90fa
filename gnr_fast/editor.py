"""The public entry point: :class:`Editor` loads a checkpoint, inverts images and edits them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from .batch import edit_batch
from .config import PRESET_STEPS, EditConfig
from .consistency_models import is_consistency_model, load_consistency_model
from .editing import EditContext, StepCallback, StepTerms
from .errors import ConfigError, GnrError, InputError
from .fast.source_cache import SourceCache
from .images import DEFAULT_MAX_PIXELS, ImageInput, prepare_image
from .inversion import Inversion
from .loading import Components, load_components
from .model_defaults import SAMPLER_NAMES, ModelDefaults, load_model_defaults
from .precision import ModelDtype, PrecisionPolicy
from .prompts import check_prompt
from .requests import EditRequest, check_steps, resolve_config
from .hub import resolve_model
from .output_types import OutputType, check_output_type
from .results import EditResult, Timings
from .runtime import RuntimeConfig
from .samplers import ConsistencySampler
from .session import EditSession, SourceCachePolicy
from .step_callbacks import StepEnd, StepEndCallback

logger = logging.getLogger(__name__)

Mode = Literal["fast", "reference"]
MODES = ("fast", "reference")

__all__ = ["EditResult", "Editor", "Timings"]


class Editor(EditSession):
    """Guide-and-Rescale editing with one loaded Stable Diffusion 1.x/2.x checkpoint.

    An :class:`~gnr_fast.session.EditSession` (components, executor, layers, prompt embeddings,
    source-cache policy) with the entry points: load, invert, edit.

    Every UNet call goes through :attr:`runner`, a :class:`~gnr_fast.runtime.UNetExecutor` over
    the backends :attr:`runtime` names (eager PyTorch by default; ``runtime="compiled"`` for
    ``torch.compile``), which also counts the calls. A consistency model (docs/consistency-models.md)
    is the same editor with a second executor, :attr:`inversion_runner`, over its forward UNet, and
    the consistency sampler (``inversion_unet``, ``sampler``).
    """

    def __init__(
        self,
        components: Components,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        source_cache_mb: float = 2048,
        source_cache_dtype: torch.dtype | None = None,
        defaults: ModelDefaults | None = None,
        runtime: RuntimeConfig | str | None = None,
        inversion_unet: torch.nn.Module | None = None,
        sampler: ConsistencySampler | None = None,
    ) -> None:
        # What the model folder declares (gnr_fast.json): the preset used when a call names none,
        # and the caption grammar prompts are checked against.
        super().__init__(
            components,
            RuntimeConfig.resolve(runtime),
            defaults if defaults is not None else ModelDefaults(),
            max_pixels,
            SourceCachePolicy(int(source_cache_mb * 1024**2), source_cache_dtype or components.dtype),
            inversion_unet=inversion_unet,
            sampler=sampler,
        )

    @property
    def source_cache_bytes(self) -> int:
        return self.source_cache.max_bytes

    @property
    def source_cache_dtype(self) -> torch.dtype:
        return self.source_cache.storage_dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: ModelDtype = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        source_cache_mb: float = 2048,
        source_cache_dtype: torch.dtype | None = None,
        runtime: RuntimeConfig | str | None = None,
        prediction_type: str | None = None,
        config: str | Path | None = None,
        precision: PrecisionPolicy | None = None,
        sampler: str | None = None,
        teacher_unet: str | Path | None = None,
        reverse_lora: str | Path | None = None,
        forward_lora: str | Path | None = None,
    ) -> Editor:
        """Load a local diffusers SD 1.x/2.x folder or single-file checkpoint (``None``: the bundled model).

        Never contacts a hub: a hub id ``org/name`` is read from the local Hugging Face cache
        (:mod:`gnr_fast.hub`). A ``.safetensors``/``.ckpt`` file is detected as SD 1.x or 2.x and loaded
        with shipped configs; ``prediction_type`` ('epsilon' | 'v_prediction') overrides the detected
        or configured one, ``config`` names a folder of diffusers configs for other architectures
        (README, "Single-file checkpoints").
        ``source_cache_mb`` bounds the source-pass internals a fast edit keeps with an inversion
        (0 disables the cache); ``source_cache_dtype`` stores them in another dtype (e.g. float16).
        The folder's ``gnr_fast.json`` (optional, :mod:`gnr_fast.model_defaults`) sets
        :attr:`default_preset` (``shapes`` for the bundled model, else ``nonstyle``); a malformed
        one raises :class:`ModelLoadError`/:class:`ConfigError`.
        ``runtime`` is a :class:`~gnr_fast.runtime.RuntimeConfig` or a preset name (``"eager"``,
        the default, or ``"compiled"``); an unavailable backend raises
        :class:`~gnr_fast.errors.BackendUnavailableError` naming what is missing.
        ``dtype`` is the UNet's and text encoder's (the VAE's follows ``precision``); ``"auto"``, the
        default, loads bfloat16 for an SD-size model (widest UNet block ≥ 1280 channels) on a CPU with
        native bfloat16 and float32 elsewhere — the small bundled model, CUDA
        (:func:`gnr_fast.precision.default_model_dtype`, logged once; an explicit
        ``precision`` policy's dtype wins).
        ``precision`` (:class:`~gnr_fast.precision.PrecisionPolicy`, docs/precision.md) sets the VAE
        upcast, the float16 loss scale and whether inversions of another dtype may be edited; its
        ``model_dtype`` must equal ``dtype`` (default: ``PrecisionPolicy(model_dtype=dtype)``).
        ``sampler`` (None: the folder's, from its ``gnr_fast.json``) ``"consistency"`` loads the
        few-step consistency model of a folder that offers consistency files
        (docs/consistency-models.md; the bundled model does), ``"ddim"`` the DDIM editor;
        ``teacher_unet``, ``reverse_lora`` and ``forward_lora`` name (or replace the folder's)
        consistency files and select the consistency sampler. A consistency editor is this class:
        the same session, executors, runtimes, batches and source cache, with its own sampler.
        """
        path = resolve_model(path)  # a hub id: its snapshot in the local Hugging Face cache
        if sampler not in (None, *SAMPLER_NAMES):
            raise ConfigError(f"sampler {sampler!r} is unknown; choose one of {list(SAMPLER_NAMES)}")
        files = (teacher_unet, reverse_lora, forward_lora)
        if any(f is not None for f in files) and sampler == "ddim":
            raise ConfigError("teacher_unet/reverse_lora/forward_lora are consistency files; drop them or sampler='ddim'")
        if sampler == "consistency" or any(f is not None for f in files) or (sampler is None and is_consistency_model(path)):
            # few-step consistency models: their own sampler (docs/consistency-models.md)
            model = load_consistency_model(path, device=device, dtype=dtype, teacher_unet=teacher_unet,
                                           reverse_lora=reverse_lora, forward_lora=forward_lora, precision=precision)
            return cls(
                model.components,
                max_pixels=max_pixels,
                source_cache_mb=source_cache_mb,
                source_cache_dtype=source_cache_dtype,
                defaults=dataclasses.replace(model.defaults, preset=model.preset),
                runtime=runtime,
                inversion_unet=model.forward,
                sampler=model.sampler,
            )
        components = load_components(path, device=device, dtype=dtype, prediction_type=prediction_type, config=config,
                                     precision=precision)
        return cls(
            components,
            max_pixels=max_pixels,
            source_cache_mb=source_cache_mb,
            source_cache_dtype=source_cache_dtype,
            defaults=load_model_defaults(components.path),
            runtime=runtime,
        )

    @classmethod
    def from_pipe(
        cls,
        pipe: Any,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        source_cache_mb: float = 2048,
        source_cache_dtype: torch.dtype | None = None,
        runtime: RuntimeConfig | str | None = None,
    ) -> Editor:
        """An editor on the modules of a loaded diffusers ``StableDiffusionPipeline`` (or
        ``StableDiffusionImg2ImgPipeline``, :class:`~gnr_fast.pipeline.GuideAndRescalePipeline`).

        No weight is copied: edits run the pipeline's own UNet, VAE and text encoder on their device
        and in their dtypes, with any LoRA loaded or fused into them, and the noise schedule of its
        scheduler's config (gnr-fast always inverts and edits with DDIM). The UNet gets gnr-fast's
        attention processors (plain attention outside edits) and the modules are set to eval mode
        without gradients (:mod:`gnr_fast.pipe_components`). Other pipelines raise
        :class:`~gnr_fast.errors.UnsupportedArchitectureError` naming the supported ones. The other
        arguments mean what they mean in :meth:`from_pretrained`; the preset defaults come from the
        pipeline's folder's ``gnr_fast.json`` when it was loaded from one.
        """
        from .pipe_components import components_from_pipe

        components = components_from_pipe(pipe)
        return cls(
            components,
            max_pixels=max_pixels,
            source_cache_mb=source_cache_mb,
            source_cache_dtype=source_cache_dtype,
            defaults=load_model_defaults(components.path),
            runtime=runtime,
        )

    def invert(
        self, image: ImageInput, source_prompt: str, num_steps: int | None = None, progress: bool = True
    ) -> Inversion:
        """Invert ``image`` with ``source_prompt``: DDIM in ``num_steps`` steps (None: 50; DESIGN.md §2),
        or a consistency model's forward jumps (None: its step count, the only one it takes)."""
        check_prompt(source_prompt, "source_prompt")
        if num_steps is None:
            num_steps = self.default_steps if self.default_steps is not None else PRESET_STEPS
        check_steps(num_steps)
        prepared = prepare_image(image, max_pixels=self.max_pixels)
        return self.invert_prepared([prepared], [source_prompt], num_steps, progress)[0]

    def resolve_config(
        self, preset: str | None = None, config: EditConfig | str | Path | None = None, num_steps: int | None = None
    ) -> EditConfig:
        """The config an edit runs: ``config`` (object or YAML path) if given, else the named preset
        (``None``: this editor's default preset)."""
        return resolve_config(self, preset, config, num_steps)

    def edit(
        self,
        image_or_inversion: ImageInput | Inversion,
        target_prompt: str,
        source_prompt: str | None = None,
        preset: str | None = None,
        config: EditConfig | str | Path | None = None,
        mode: Mode = "fast",
        progress: bool = True,
        num_steps: int | None = None,
        callback: StepCallback | None = None,
        output_type: OutputType = "pil",
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    ) -> EditResult:
        """Edit an image (or a saved inversion of one) toward ``target_prompt``.

        With an image, ``source_prompt`` is required and the image is inverted first; with an
        :class:`Inversion`, its source prompt is used (a different ``source_prompt`` is an error).
        ``preset=None`` runs the editor's default preset. ``mode="fast"`` runs the planned passes
        (and fills/uses the inversion's source cache) — the same path as :meth:`edit_batch` with
        one request; ``mode="reference"`` runs the paper-literal four passes per step. Both give
        the same edit within the golden tolerances.

        ``output_type`` (``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``, :mod:`gnr_fast.output_types`)
        is the type of ``result.image``; ``"latent"`` skips the VAE decode. Two step callbacks:
        ``callback(step, timestep, latent, terms)``, gnr-fast's read-only observer of each step's
        typed :class:`~gnr_fast.editing.StepTerms`, and diffusers' ``callback_on_step_end(editor,
        step, timestep, callback_kwargs) -> dict`` with ``callback_on_step_end_tensor_inputs``
        (:mod:`gnr_fast.step_callbacks`), which can replace the latents and stop the edit by
        setting ``editor._interrupt = True`` — the result is then the partial one, marked
        ``interrupted=True`` with its ``steps_done``.
        """
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "reference" and self.fixed_sampler is not None:
            raise ConfigError("mode='reference' is the paper-literal DDIM edit; a consistency model edits in mode='fast'")
        check_output_type(output_type)
        step_end = StepEnd(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        request = EditRequest(image_or_inversion, target_prompt, source_prompt, preset, config, num_steps)
        options = {"progress": progress, "callback": callback, "output_type": output_type, "on_step_end": step_end}
        if mode == "fast":
            (result,) = edit_batch(self, [request], **options)
        else:
            (result,) = edit_batch(self, [request], **options, step_fn=_reference_batch_step, max_group=1,
                                   source_cache=False)
        result.steps_done = step_end.steps_done
        result.interrupted = step_end.stopped and step_end.steps_done < result.config.num_steps
        return result

    def source_cache_for(self, inversion: Inversion, ctx: EditContext) -> SourceCache | None:
        """The inversion's source cache for this edit's pairing/layers (a fresh one if they changed);
        ``None`` when this editor keeps no source cache."""
        return self.source_cache.cache_for(inversion, ctx)

    def new_source_cache(self, ctx: EditContext) -> SourceCache:
        """An empty source cache for edits with ``ctx``'s pairing, layers, feature sites and steps,
        bounded by this editor's ``source_cache_mb`` and stored in its ``source_cache_dtype``."""
        return self.source_cache.new_cache(ctx)

    def edit_batch(
        self, requests: Sequence[EditRequest], progress: bool = False, return_exceptions: bool = False
    ) -> list[EditResult | GnrError]:
        """Run several fast-mode edits at once; compatible ones share UNet calls (see :mod:`gnr_fast.batch`)."""
        return edit_batch(self, requests, progress=progress, return_exceptions=return_exceptions)

    def edit_many(
        self,
        inversion: Inversion,
        target_prompts: list[str],
        preset: str | None = None,
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


def _reference_batch_step(ctxs, z, z_star, step, sources) -> list[StepTerms]:
    """The paper-literal reference step (:mod:`gnr_fast.reference.step`) in the batch-step signature."""
    from .reference.step import reference_step

    return [reference_step(ctx, zb, zs, step) for ctx, zb, zs in zip(ctxs, z, z_star)]
