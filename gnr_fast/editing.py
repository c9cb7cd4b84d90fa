"""The editing loop shared by every execution mode and every batch size (DESIGN.md §3, §9).

A mode supplies a *batch step function* computing one :class:`StepTerms` per image for the
current latents; :func:`run_edit_loop` pairs each latent with its inversion trajectory, drops an
image whose noise turns non-finite, and applies the sampler's step (DDIM, or a consistency jump)
to the rest. A single edit is a batch of one. Latents, the update and the terms are float32 whatever
the model dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm.auto import tqdm

from .attention.capture import SelfAttnLayer, select_layers
from .config import EditConfig
from .errors import GuidanceError
from .loading import Components
from .noise_terms import StepTerms
from .runtime.executor import UNetExecutor
from .samplers import Sampler
from .samplers.ddim import DDIMSampler
from .schedules import timestep_tensors

if TYPE_CHECKING:  # importing gnr_fast.fast runs its __init__, which imports the fast step, which imports this module
    from .fast.source_cache import SourceCache


@dataclass(eq=False)
class EditState:
    """What changes during one edit (the constants are :class:`EditContext`'s)."""

    source_cache: SourceCache | None = None  # the cache of the inversion being edited, if any
    loss_scale: float | None = None  # float16 grad calls: the scale that last worked (None: the policy's)


@dataclass(frozen=True, eq=False)
class EditContext:
    """Per-edit constants: model, executor, prompt embeddings, config, the selected layers and the
    sampler (timesteps, row conditioning, noise composition, the step); and the edit's mutable
    :class:`EditState`."""

    components: Components
    runner: UNetExecutor
    config: EditConfig
    c_uncond: torch.Tensor  # [1, 77, C] embedding of ""
    c_src: torch.Tensor  # [1, 77, C] source prompt
    c_trg: torch.Tensor  # [1, 77, C] target prompt
    layers: frozenset[int]  # selected self-attention layers
    timesteps: list[int] = field(default_factory=list)
    timestep_tensors: tuple[torch.Tensor, ...] = ()  # the same as 0-dim long tensors on the device
    state: EditState = field(default_factory=EditState)
    sampler: Sampler | None = None  # always set by :meth:`build`

    @classmethod
    def build(
        cls,
        components: Components,
        runner: UNetExecutor,
        config: EditConfig,
        all_layers: Sequence[SelfAttnLayer],
        c_uncond: torch.Tensor,
        c_src: torch.Tensor,
        c_trg: torch.Tensor,
        sampler: Sampler | None = None,
    ) -> EditContext:
        """The context of one edit; ``sampler`` None: DDIM with the config's step count."""
        if sampler is None:
            sampler = DDIMSampler(components.schedule, config.num_steps)
        timesteps = list(sampler.timesteps)
        return cls(
            components=components,
            runner=runner,
            config=config,
            c_uncond=c_uncond,
            c_src=c_src,
            c_trg=c_trg,
            layers=select_layers(all_layers, config.self_attn_layers),
            timesteps=timesteps,
            timestep_tensors=timestep_tensors(timesteps, components.device),
            sampler=sampler,
        )


def source_latent(inversion_latents: torch.Tensor, step: int, config: EditConfig) -> torch.Tensor:
    """z* paired with step ``step``: inv[N − i] as the reference does, or the time-aligned inv[N − 1 − i]."""
    n = config.num_steps
    index = n - step if config.align_inversion == "reference" else n - 1 - step
    return inversion_latents[index]


class StepFunction(Protocol):
    """One image's step (the reference step's signature)."""

    def __call__(self, ctx: EditContext, z: torch.Tensor, z_star: torch.Tensor, step: int) -> StepTerms: ...


class BatchStepFunction(Protocol):
    """The terms of ``step`` for several images; ``sources`` names each image's inversion (equal
    names share one source pass)."""

    def __call__(
        self,
        ctxs: Sequence[EditContext],
        z: Sequence[torch.Tensor],
        z_star: Sequence[torch.Tensor],
        step: int,
        sources: Sequence[object],
    ) -> list[StepTerms]: ...


StepCallback = Callable[[int, int, torch.Tensor, StepTerms], None]
"""callback(step, timestep, new_latent, terms) after each step (per image of a batch)."""


class StepEndHook(Protocol):
    """Runs after each step (and its callbacks) on the batch's latents ``[B, 4, h, w]`` float32; returns
    the latents the next step starts from (these, or a replacement of their shape) and whether the
    edit stops here (:class:`gnr_fast.step_callbacks.StepEnd`: diffusers' ``callback_on_step_end``)."""

    def __call__(
        self, step: int, timestep: int, latents: torch.Tensor, terms: Sequence[StepTerms]
    ) -> tuple[torch.Tensor, bool]: ...


@dataclass(eq=False)
class LoopItem:
    """One image moving through :func:`run_edit_loop`."""

    ctx: EditContext
    trajectory: torch.Tensor  # [N + 1, 1, 4, h, w] float32, on the device
    source: object  # names the inversion (id of it): items with the same one share its source pass


def run_edit_loop(
    items: Sequence[LoopItem],
    step_fn: BatchStepFunction,
    progress: bool = True,
    callback: StepCallback | None = None,
    on_step_end: StepEndHook | None = None,
) -> list[torch.Tensor | GuidanceError]:
    """Denoise every item from inv[N] with ``step_fn``'s noise; the final latent ([1, 4, h, w],
    float32) of each item, or the :class:`GuidanceError` of an item whose noise turned non-finite.
    When ``on_step_end`` stops the loop early, the latents reached so far are the final ones.

    Items must share the config, the working size and the executor. Host syncs per step: one (the
    finite check of every item's ε_final and γ, which decides who stays in the batch).
    """
    ctx0 = items[0].ctx
    sampler = ctx0.sampler
    outcomes: list[torch.Tensor | GuidanceError | None] = [None] * len(items)
    live = list(range(len(items)))
    z = torch.cat([items[b].trajectory[-1] for b in live]).float()  # [B, 4, h, w]
    desc = "Editing" if len(items) == 1 else f"Editing ×{len(items)}"
    for i, t in enumerate(tqdm(ctx0.timesteps, desc=desc, disable=not progress, leave=False)):
        terms = step_fn(
            [items[b].ctx for b in live],
            list(z.split(1)),
            [source_latent(items[b].trajectory, i, ctx0.config) for b in live],
            i,
            [items[b].source for b in live],
        )
        finite = torch.stack(
            [torch.isfinite(term.eps_final).all() & torch.isfinite(term.gamma) for term in terms]
        ).tolist()  # the step's one host sync
        kept = []
        for j, (b, term, ok) in enumerate(zip(live, terms, finite)):
            if ok:
                kept.append(j)
            else:
                outcomes[b] = GuidanceError(
                    f"step {i} (t={t}) produced non-finite noise (energy={float(term.energy)}, "
                    f"gamma={float(term.gamma)}); lower the guider scales or check the model"
                )
        if not kept:
            return outcomes  # type: ignore[return-value]
        if len(kept) < len(live):
            z, terms, live = z[kept], [terms[j] for j in kept], [live[j] for j in kept]
        with torch.no_grad():
            eps_final = torch.cat([term.eps_final for term in terms])  # [B, 4, h, w]
            z = sampler.step(z, eps_final, i)  # the sampler's step (DDIM: DESIGN.md §3 step 8)
        if callback is not None:
            for j, term in enumerate(terms):
                callback(i, t, z[j : j + 1], term)
        if on_step_end is not None:
            z, stop = on_step_end(i, t, z, terms)
            if stop:
                break
    for j, b in enumerate(live):
        outcomes[b] = z[j : j + 1]
    return outcomes  # type: ignore[return-value]
