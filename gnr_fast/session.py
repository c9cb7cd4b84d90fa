"""The edit session: what a loaded model lends every edit, so batch and request code never call
back into :class:`~gnr_fast.editor.Editor` (docs/architecture.md).

An :class:`EditSession` holds the components, the UNet executor, the instrumented self-attention
layers, the prompt-embedding cache, the source-cache policy and the sampler, and builds each edit's
:class:`~gnr_fast.editing.EditContext`. A consistency model (docs/consistency-models.md) is a
session with two executors — :attr:`runner` over the reverse (editing) UNet, whose every call the
planner makes, and :attr:`inversion_runner` over the forward (inversion) UNet — and the consistency
sampler; a DDIM session's inversion runs on its one executor. :mod:`gnr_fast.batch` and :mod:`gnr_fast.requests` take one;
:class:`~gnr_fast.editor.Editor` is one (it adds loading and the entry points), so
``edit_batch(editor, ...)`` keeps working while this module never names the editor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .attention import install_capture_processors
from .config import EditConfig
from .editing import EditContext
from .errors import ConfigError
from .fast.source_cache import CacheKey, SourceCache
from .fast.step import source_sites
from .images import PreparedImage
from .inversion import Inversion, invert_many
from .loading import Components
from .model_defaults import ModelDefaults
from .prompts import encode_prompt, warn_if_outside_grammar
from .runtime import RuntimeConfig, UNetExecutor
from .samplers import ConsistencySampler, DDIMSampler, Sampler

PROMPT_CACHE_SIZE = 64
"""Prompt embeddings kept before the cache is emptied."""


@dataclass(frozen=True)
class SourceCachePolicy:
    """How much of the source pass's internals a fast edit keeps with its inversion, and in which dtype."""

    max_bytes: int  # 0: keep none
    storage_dtype: torch.dtype

    def new_cache(self, ctx: EditContext) -> SourceCache:
        """An empty source cache for edits with ``ctx``'s pairing, layers, feature sites and steps."""
        key = CacheKey(ctx.config.align_inversion, ctx.layers, source_sites(ctx), ctx.config.num_steps)
        return SourceCache(key, max_bytes=self.max_bytes, storage_dtype=self.storage_dtype)

    def cache_for(self, inversion: Inversion, ctx: EditContext) -> SourceCache | None:
        """The inversion's source cache for ``ctx``'s pairing/layers (a fresh one replaces it if they
        changed); ``None`` when the policy keeps no cache."""
        if self.max_bytes <= 0:
            return None
        fresh = self.new_cache(ctx)
        if inversion.source_cache is None or inversion.source_cache.key != fresh.key:
            inversion.source_cache = fresh
        return inversion.source_cache


class EditSession:
    """One loaded model ready to edit: components, executor(s), layers, prompt embeddings,
    source-cache policy, sampler.

    ``inversion_unet`` and ``sampler`` are a consistency model's forward UNet and its
    :class:`~gnr_fast.samplers.ConsistencySampler` (both or neither); without them the session
    inverts with ``components.unet`` and samples with DDIM at each config's step count.
    """

    def __init__(
        self,
        components: Components,
        runtime: RuntimeConfig,
        defaults: ModelDefaults,
        max_pixels: int,
        source_cache: SourceCachePolicy,
        inversion_unet: torch.nn.Module | None = None,
        sampler: ConsistencySampler | None = None,
    ) -> None:
        if (inversion_unet is None) != (sampler is None):
            raise ValueError("a consistency session needs both its forward UNet and its sampler")
        self.components = components
        self.runtime = runtime
        self.defaults = defaults  # the model folder's gnr_fast.json: default preset, caption grammar
        self.max_pixels = max_pixels
        self.source_cache = source_cache
        self.self_attn_layers, feature_sites = install_capture_processors(components.unet)
        self.runner = UNetExecutor(components.unet, self.self_attn_layers, feature_sites, runtime)
        self.inversion_runner = self.runner
        # the UNet inversions run: a consistency model's forward one, else the editing UNet
        self.inversion_unet: torch.nn.Module = inversion_unet if inversion_unet is not None else components.unet
        if inversion_unet is not None:  # plain calls only, but an executor needs its UNet's layers
            layers, sites = install_capture_processors(inversion_unet)
            self.inversion_runner = UNetExecutor(inversion_unet, layers, sites, runtime)
        self.fixed_sampler = sampler
        self.embeddings: dict[str, torch.Tensor] = {}

    @property
    def default_steps(self) -> int | None:
        """The step count of an edit that names none: the consistency model's, or None (the preset's)."""
        return self.fixed_sampler.num_steps if self.fixed_sampler is not None else None

    def sampler_for(self, config: EditConfig) -> Sampler:
        """The sampler of an edit with ``config``: the consistency model's (raising
        :class:`ConfigError` for a config it cannot run), else DDIM with the config's step count."""
        if self.fixed_sampler is None:
            return DDIMSampler(self.components.schedule, config.num_steps)
        self.fixed_sampler.check_config(config)
        return self.fixed_sampler

    def check_inversion_steps(self, num_steps: int) -> None:
        """Raise :class:`ConfigError` when this session cannot invert in ``num_steps`` steps."""
        if self.fixed_sampler is not None and num_steps != self.fixed_sampler.num_steps:
            raise ConfigError(f"this consistency model inverts and edits in {self.fixed_sampler.num_steps} steps, "
                              f"got num_steps={num_steps}")

    @property
    def model_id(self) -> str:
        return self.components.model_id

    @property
    def default_preset(self) -> str:
        """The preset an edit runs when it names none."""
        return self.defaults.preset

    def embed(self, prompt: str) -> torch.Tensor:
        """CLIP embedding of ``prompt`` ([1, 77, C]); repeated prompts are served from a small cache."""
        if prompt not in self.embeddings:
            warn_if_outside_grammar(self.defaults.caption_grammar, prompt)
            if len(self.embeddings) > PROMPT_CACHE_SIZE:
                self.embeddings.clear()
            self.embeddings[prompt] = encode_prompt(self.components, prompt, self.defaults.caption_grammar)
        return self.embeddings[prompt]

    def invert_prepared(
        self, images: Sequence[PreparedImage], source_prompts: Sequence[str], num_steps: int, progress: bool = False
    ) -> list[Inversion]:
        """Invert already prepared and validated images, in order, with the session's sampler (DDIM in
        ``num_steps`` steps, or the consistency model's forward jumps); images of one working size
        share every UNet call (:func:`~gnr_fast.inversion.invert_many`)."""
        self.check_inversion_steps(num_steps)
        embeddings = [self.embed(prompt) for prompt in source_prompts]
        sampler = self.fixed_sampler if self.fixed_sampler is not None else DDIMSampler(self.components.schedule, num_steps)
        return invert_many(self.components, self.inversion_runner, images, source_prompts, embeddings, num_steps,
                           progress, sampler=sampler)

    def context(self, config: EditConfig, source_prompt: str, target_prompt: str) -> EditContext:
        """The per-edit constants of an edit of ``config`` from ``source_prompt`` to ``target_prompt``."""
        return EditContext.build(
            self.components,
            self.runner,
            config,
            self.self_attn_layers,
            c_uncond=self.embed(""),
            c_src=self.embed(source_prompt),
            c_trg=self.embed(target_prompt),
            sampler=self.sampler_for(config),
        )
