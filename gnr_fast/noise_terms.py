"""The noise predictions a step's UNet rows supply, and the terms a sampler composes from them.

Below the samplers, the planner and the edit loop: :class:`Eps` names what a plan row's output
is, :class:`NoiseRows` is what a sampler declares about the rows its noise needs (the planner
reads it), and :class:`StepTerms` is one image's composed step (what callbacks observe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class Eps(str, Enum):
    """The noise predictions a step's rows supply (DESIGN.md §3): ε(z_t, t, prompt), and ε(z*_t, t, c_src)."""

    U = "eps_u"  # unconditional prompt ""
    SRC = "eps_src"  # source prompt at z
    TRG = "eps_trg"  # target prompt at z
    INV = "eps_inv"  # source prompt at z* (the source pass; a consistency step's rescaling reference)


@dataclass(frozen=True)
class NoiseRows:
    """What a sampler's noise composition needs from a step's UNet rows.

    ``base``: the noise every step starts from (DDIM: ε_u; a consistency model: ε_trg, whose
    guidance-scale embedding carries the CFG). ``cfg_row``: a separate classifier-free-guidance
    prompt row when the cfg guider's scale is not 0 (DDIM). ``source_noise``: the source pass's ε
    (ε_inv) is a term whenever an energy is active, so the source pass runs (or its cache serves it)
    with the ε kept.
    """

    base: Eps
    cfg_row: bool
    source_noise: bool


@dataclass
class StepTerms:
    """The noise terms of one editing step of one image; ε_final = base + Δcfg + γ · grad + direct.

    ``eps_u`` is the sampler's base noise (DDIM: ε_u; consistency: ε_trg, with ``delta_cfg`` zero:
    the guidance-scale embedding carries the CFG). ``supplied`` holds every ε the step's rows gave
    (by :class:`Eps`), e.g. ε_inv, the consistency rescaling reference's second term.
    Tensors are float32; ``gamma`` and ``energy`` are 0-dim tensors (no host sync to produce them).
    """

    eps_u: torch.Tensor  # [1, 4, h, w]
    delta_cfg: torch.Tensor  # [1, 4, h, w]
    guider_grad: torch.Tensor | None  # ∂E/∂z before γ; None when no energy was active
    gamma: torch.Tensor  # 0-dim
    direct: torch.Tensor | None  # guiders that add a noise term directly (latents_diff)
    eps_final: torch.Tensor  # [1, 4, h, w]
    energy: torch.Tensor | float  # Σ_g v_g(i) · E_g (0 when no energy guider was active)
    supplied: dict[Eps, torch.Tensor] = field(default_factory=dict)  # each [1, 4, h, w], detached
