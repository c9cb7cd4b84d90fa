"""The fast editing step: runs a :class:`~gnr_fast.fast.plan.StepPlan` (DESIGN.md §3, §8).

Same terms as the reference step, computed with batched no-grad passes, one grad call, the
chunked attention-map energy over captured (Q, K, lse) — never an N×N map — and the source
pass served from the inversion cache when present.
"""

from __future__ import annotations

import torch

from ..attention.capture import CaptureMode, PassCapture
from ..config import FeatureSite, LatentsDiff, Role, scale_at
from ..editing import EditContext, StepTerms, combine_terms
from ..guiders import guider_energy, latents_diff
from .plan import Latent, Prompt, StepPlan, cfg_guider, plan_step


def source_sites(ctx: EditContext) -> frozenset[FeatureSite]:
    """Every feature site any guider of the config reads from the source pass."""
    return frozenset(g.feature_site for g in ctx.config.guiders if Role.INV_INV in g.reads and hasattr(g, "feature_site"))


def row_capture(ctx: EditContext, plan: StepPlan, role: Role, row: int) -> PassCapture:
    """The capture batch row ``row`` of a call records for ``role`` under ``plan`` (Q/K of the
    selected layers if an attention energy reads the role, its feature sites, lse for the source)."""
    readers = [g for g in plan.energies if role in g.reads]
    reads_maps = any(g.name in ("self_attn_map_l2", "self_attn_map_l2_appearance") for g in readers)
    sites = source_sites(ctx) if role is Role.INV_INV else frozenset(g.feature_site for g in readers if hasattr(g, "feature_site"))
    return PassCapture(
        layers=ctx.layers if reads_maps else frozenset(),
        mode=CaptureMode.QK,
        feature_sites=sites,
        rows=slice(row, row + 1),
        with_lse=role is Role.INV_INV,
    )


def prompt_embedding(ctx: EditContext, prompt: Prompt) -> torch.Tensor:
    """The embedding a plan row's prompt names: [1, 77, C]."""
    return {Prompt.UNCOND: ctx.c_uncond, Prompt.SRC: ctx.c_src, Prompt.TRG: ctx.c_trg}[prompt]


def step_terms(
    ctx: EditContext,
    step: int,
    eps: dict[str, torch.Tensor],
    z: torch.Tensor,
    z_star: torch.Tensor,
    guider_grad: torch.Tensor | None,
    energy: float,
) -> StepTerms:
    """Δcfg = w · (ε_prompt − ε_u), the direct terms, then γ and the sum (DESIGN.md §3 steps 5–7)."""
    cfg = cfg_guider(ctx.config)
    eps_u = eps["eps_u"]  # [1, 4, h, w]
    prompt_eps = eps.get("eps_src" if cfg.is_source_guidance else "eps_trg")
    delta_cfg = scale_at(cfg.scale, step) * (prompt_eps - eps_u) if prompt_eps is not None else torch.zeros_like(eps_u)
    direct = None
    for guider in ctx.config.guiders:
        if isinstance(guider, LatentsDiff):
            term = scale_at(guider.scale, step) * latents_diff(z.detach(), z_star)
            direct = term if direct is None else direct + term
    return combine_terms(ctx.config, eps_u, delta_cfg, guider_grad, direct, energy)


def fast_step(ctx: EditContext, z: torch.Tensor, z_star: torch.Tensor, step: int) -> StepTerms:
    """Compute the noise terms of ``step`` by the plan for it (see :func:`plan_step`)."""
    cache = ctx.source_cache
    cached = cache.get(step, z.dtype) if cache is not None else None
    plan = plan_step(ctx.config, step, source_cached=cached is not None, energies_vanish=torch.equal(z, z_star))
    t = ctx.timesteps[step]
    eps: dict[str, torch.Tensor] = {}
    captures: dict[Role, PassCapture] = {}
    if cached is not None and plan.energies:
        captures[Role.INV_INV] = cached
    z_grad = z.detach().requires_grad_(True)
    for call in plan.calls:
        call_captures = []
        for j, row in enumerate(call.rows):
            if row.role is not None:
                captures[row.role] = row_capture(ctx, plan, row.role, j)
                call_captures.append(captures[row.role])
        current = z_grad if call.grad else z.detach()
        latents = torch.cat([current if row.latent is Latent.CUR else z_star for row in call.rows])
        context = torch.cat([prompt_embedding(ctx, row.prompt) for row in call.rows])
        with torch.set_grad_enabled(call.grad):
            out = ctx.runner(latents, t, context, tuple(call_captures))
        for j, row in enumerate(call.rows):
            if row.supplies is not None:
                eps[row.supplies] = out[j : j + 1].detach()
        if cache is not None and Role.INV_INV in captures and not call.grad and cached is None:
            if any(r.role is Role.INV_INV for r in call.rows):
                cache.put(step, captures[Role.INV_INV])

    energy = None
    with torch.enable_grad():
        for guider in plan.energies:
            value = guider_energy(guider, step, captures, ctx.layers)
            # The reference drops an energy that torch.allclose(E, 0) accepts, i.e. |E| ≤ atol.
            if abs(float(value.detach())) > ctx.config.energy_atol:
                energy = value if energy is None else energy + value
        guider_grad = torch.autograd.grad(energy, z_grad)[0] if energy is not None else None
    return step_terms(ctx, step, eps, z, z_star, guider_grad, 0.0 if energy is None else float(energy.detach()))
