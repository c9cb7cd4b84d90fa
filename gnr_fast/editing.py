"""The editing loop shared by every execution mode (DESIGN.md §3).

A mode supplies a *step function* computing :class:`StepTerms` for the current latent; the loop
pairs latents with the inversion trajectory, applies the DDIM step and reports progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from .attention.capture import SelfAttnLayer, select_layers
from .config import EditConfig
from .errors import GuidanceError
from .loading import Components
from .rescaling import rescale_factor
from .runtime.base import UNetRunner
from .schedules import ddim_step_down, ddim_timesteps


@dataclass
class EditContext:
    """Per-edit constants: model, runner, prompt embeddings, config and the selected layers."""

    components: Components
    runner: UNetRunner
    config: EditConfig
    c_uncond: torch.Tensor  # [1, 77, C] embedding of ""
    c_src: torch.Tensor  # [1, 77, C] source prompt
    c_trg: torch.Tensor  # [1, 77, C] target prompt
    layers: frozenset[int]  # selected self-attention layers
    timesteps: list[int] = field(default_factory=list)
    source_cache: Any = None  # gnr_fast.fast.SourceCache of the inversion being edited, if any

    @classmethod
    def build(
        cls,
        components: Components,
        runner: UNetRunner,
        config: EditConfig,
        all_layers: list[SelfAttnLayer],
        c_uncond: torch.Tensor,
        c_src: torch.Tensor,
        c_trg: torch.Tensor,
    ) -> "EditContext":
        return cls(
            components=components,
            runner=runner,
            config=config,
            c_uncond=c_uncond,
            c_src=c_src,
            c_trg=c_trg,
            layers=select_layers(all_layers, config.self_attn_layers),
            timesteps=ddim_timesteps(config.num_steps, components.schedule.num_train_timesteps),
        )


@dataclass
class StepTerms:
    """The noise terms of one editing step; ε_final = ε_u + Δcfg + γ · grad + direct terms."""

    eps_u: torch.Tensor  # [1, 4, h, w]
    delta_cfg: torch.Tensor  # [1, 4, h, w]
    guider_grad: torch.Tensor | None  # ∂E/∂z before γ; None when no energy was active
    gamma: float
    direct: torch.Tensor | None  # guiders that add a noise term directly (latents_diff)
    eps_final: torch.Tensor  # [1, 4, h, w]
    energy: float  # Σ_g v_g(i) · E_g (0 when no energy guider was active)


def combine_terms(
    config: EditConfig,
    eps_u: torch.Tensor,
    delta_cfg: torch.Tensor,
    guider_grad: torch.Tensor | None,
    direct: torch.Tensor | None,
    energy: float,
) -> StepTerms:
    """Noise rescaling + sum (DESIGN.md §3 step 7, §5)."""
    gamma = rescale_factor(config.rescale, delta_cfg, guider_grad)
    eps_final = eps_u + delta_cfg
    if direct is not None:
        eps_final = eps_final + direct
    if guider_grad is not None:
        eps_final = eps_final + gamma * guider_grad
    return StepTerms(eps_u, delta_cfg, guider_grad, gamma, direct, eps_final.detach(), energy)


def source_latent(inversion_latents: torch.Tensor, step: int, config: EditConfig) -> torch.Tensor:
    """z* paired with step ``step``: inv[N − i] as the reference does, or the time-aligned inv[N − 1 − i]."""
    n = config.num_steps
    index = n - step if config.align_inversion == "reference" else n - 1 - step
    return inversion_latents[index]


class StepFunction(Protocol):
    def __call__(self, ctx: EditContext, z: torch.Tensor, z_star: torch.Tensor, step: int) -> StepTerms: ...


StepCallback = Callable[[int, int, torch.Tensor, StepTerms], None]
"""callback(step, timestep, new_latent, terms) after each step."""


def run_edit_loop(
    ctx: EditContext,
    step_fn: StepFunction,
    inversion_latents: torch.Tensor,
    progress: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise from inv[N] with ``step_fn``'s noise at every step; return the final latent [1, 4, h, w].

    Raises :class:`GuidanceError` when a step produces non-finite noise.
    """
    schedule = ctx.components.schedule
    z = inversion_latents[-1].clone()
    for i, t in enumerate(tqdm(ctx.timesteps, desc="Editing", disable=not progress, leave=False)):
        terms = step_fn(ctx, z, source_latent(inversion_latents, i, ctx.config), i)
        if not torch.isfinite(terms.eps_final).all() or not math.isfinite(terms.gamma):
            raise GuidanceError(
                f"step {i} (t={t}) produced non-finite noise (energy={terms.energy}, gamma={terms.gamma}); lower the "
                "guider scales or check the model"
            )
        with torch.no_grad():
            z = ddim_step_down(schedule, terms.eps_final, t, z, ctx.config.num_steps)
        if callback is not None:
            callback(i, t, z, terms)
    return z
