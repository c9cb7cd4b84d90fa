"""The fast editing step for a batch of images: runs each image's :class:`StepPlan` (DESIGN.md §3, §8, §9).

Same terms as the reference step, computed with batched calls of the three kinds (PLAIN,
CAPTURING, GRAD; see :mod:`gnr_fast.fast.plan`), the chunked attention-map energy over captured
(Q, K, lse) — never an N×N map — and the source pass served from the inversion cache when present.

For a batch of compatible images (same config, size and executor) each step runs every image's
plain rows in one call, the source row once per distinct inversion, and every grad row in one grad
call. Energies and γ are per image; one backward of Σ_b E_b gives every image's gradient at once
(UNet rows do not interact, so row b of ∂(Σ_b E_b)/∂z is ∂E_b/∂z_b). A single edit is a batch of one.

Host syncs: none here for float32/bfloat16 models. γ, the energies and the |E| ≤ atol test are
0-dim tensors; which rows run is decided by the plan (static per step and config), not by tensor
values. A float16 model's loss-scaled backward checks the scaled gradient for overflow (one sync
per guided step, :func:`~gnr_fast.precision.energy_grad_to_latent`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..attention.capture import CaptureSpec, PassCapture
from ..attention.sites import FeatureSite
from ..editing import EditContext
from ..guiders import Guider, Role, capture_need, direct_guiders
from ..noise_terms import StepTerms
from ..precision import energy_grad_to_latent
from ..runtime.calls import CallKind
from .plan import Eps, Latent, Prompt, Row, StepPlan, energies_vanish, plan_step


def source_sites(ctx: EditContext) -> frozenset[FeatureSite]:
    """Every feature site any guider of the config reads from the source pass."""
    return capture_need(ctx.config.guiders, {Role.INV_INV}).feature_sites


def role_spec(ctx: EditContext, energies: Sequence[Guider], roles: set[Role], rows: tuple[int, ...]) -> CaptureSpec:
    """What rows ``rows`` of a call record for ``roles`` under the step's ``energies``: Q/K of the
    selected layers if an attention energy reads one of them, their feature sites (every source
    site for the source pass, which the cache keeps), and lse for the source pass."""
    need = capture_need(energies, roles)
    sites = source_sites(ctx) if Role.INV_INV in roles else need.feature_sites
    return CaptureSpec(
        layers=ctx.layers if need.attention else frozenset(),
        feature_sites=sites,
        rows=rows,
        with_lse=Role.INV_INV in roles,
    )


def prompt_embedding(ctx: EditContext, prompt: Prompt) -> torch.Tensor:
    """The embedding a plan row's prompt names: [1, 77, C]."""
    return {Prompt.UNCOND: ctx.c_uncond, Prompt.SRC: ctx.c_src, Prompt.TRG: ctx.c_trg}[prompt]


def step_terms(
    ctx: EditContext,
    step: int,
    eps: dict[Eps, torch.Tensor],
    z: torch.Tensor,
    z_star: torch.Tensor,
    guider_grad: torch.Tensor | None,
    energy: torch.Tensor | float,
) -> StepTerms:
    """The direct terms, then the sampler's composition: DDIM's Δcfg = w · (ε_prompt − ε_u), γ and
    the sum (DESIGN.md §3 steps 5–7), or a consistency model's ε_trg + γ · grad."""
    direct = None
    for guider in direct_guiders(ctx.config.guiders):
        term = guider.noise(step, z, z_star)
        direct = term if direct is None else direct + term
    return ctx.sampler.terms(ctx.config, step, eps, guider_grad, direct, energy)


def batch_step(
    ctxs: Sequence[EditContext],
    z: Sequence[torch.Tensor],
    z_star: Sequence[torch.Tensor],
    step: int,
    sources: Sequence[object] | None = None,
) -> list[StepTerms]:
    """The noise terms of ``step`` for several images (each [1, 4, h, w] float32) with shared UNet calls.

    ``ctxs`` must share the config, the executor and the selected layers. ``sources`` names each
    image's inversion (equal names: the same inversion, whose source pass then runs once); by
    default every image has its own. Under the reference pairing, step 0 pairs z with z* itself,
    so its same-prompt energies are skipped (:func:`~gnr_fast.fast.plan.energies_vanish`).
    """
    count = len(ctxs)
    sources = list(range(count)) if sources is None else list(sources)
    ctx0 = ctxs[0]
    runner, sampler = ctx0.runner, ctx0.sampler
    t = ctx0.timestep_tensors[step]
    vanish = energies_vanish(ctx0.config, step)
    noise_rows = sampler.noise_rows

    # 1. One plan per image; one source-cache lookup per distinct inversion (its ε too, when the
    # sampler's noise reads the source pass's).
    cached: dict[object, PassCapture | None] = {}
    cached_eps: dict[object, torch.Tensor | None] = {}
    plans: list[StepPlan] = []
    for ctx, source in zip(ctxs, sources):
        if source not in cached:
            cache = ctx.state.source_cache
            cached[source] = cache.get(step, ctx.components.dtype) if cache is not None else None
            # stored with the capture by the same put (SourceCache.put), so present whenever it is
            cached_eps[source] = cache.noise(step) if cache is not None and noise_rows.source_noise else None
        plans.append(plan_step(ctx.config, step, source_cached=cached[source] is not None, energies_vanish=vanish,
                               split_source=runner.split_source, noise_rows=noise_rows))
    captures: list[dict[Role, PassCapture]] = [{} for _ in range(count)]
    eps: list[dict[Eps, torch.Tensor]] = [{} for _ in range(count)]
    for b, plan in enumerate(plans):
        if cached[sources[b]] is not None and plan.energies:
            captures[b][Role.INV_INV] = cached[sources[b]]
            if cached_eps[sources[b]] is not None:
                eps[b][Eps.INV] = cached_eps[sources[b]]

    # 2. The step's calls, one per kind, over every image's rows (recorded rows last in a call).
    z_cur = torch.cat([zb.detach() for zb in z])  # [B, 4, h, w]
    any_grad = any(call.grad for plan in plans for call in plan.calls)
    if any_grad:
        z_cur.requires_grad_(True)
    merged = not runner.split_source
    calls: dict[CallKind, list[tuple[int, Row]]] = {kind: [] for kind in CallKind}
    source_rows: list[tuple[int, Row]] = []
    first_of_source: dict[object, int] = {}
    for b, plan in enumerate(plans):
        for call in plan.calls:
            for row in call.rows:
                if row.role is Role.INV_INV:
                    if sources[b] not in first_of_source:  # one source pass per distinct inversion
                        first_of_source[sources[b]] = b
                        source_rows.append((b, row))
                elif call.kind is CallKind.GRAD:
                    calls[CallKind.GRAD].append((b, row))
                else:
                    calls[CallKind.PLAIN].append((b, row))
    if merged and source_rows:
        calls[CallKind.CAPTURING] = calls.pop(CallKind.PLAIN) + source_rows
        calls[CallKind.PLAIN] = []
    else:
        calls[CallKind.CAPTURING] = source_rows

    energies_of = plans[0].energies
    for kind in (CallKind.PLAIN, CallKind.CAPTURING, CallKind.GRAD):
        rows = calls[kind]
        if not rows:
            continue
        latents = torch.cat([
            (z_cur[b : b + 1] if kind is CallKind.GRAD else z_cur[b : b + 1].detach()) if row.latent is Latent.CUR
            else z_star[b]
            for b, row in rows
        ])  # [R, 4, h, w]
        context = torch.cat([prompt_embedding(ctxs[b], row.prompt) for b, row in rows])  # [R, 77, C]
        scales = sampler.guidance_scales(ctx0.config, step, [row.prompt is Prompt.TRG for _, row in rows])
        if kind is CallKind.PLAIN:
            with torch.no_grad():
                out = runner.plain(latents, t, context, scales)
        else:
            recorded = [j for j, (_, row) in enumerate(rows) if row.role is not None]
            roles = {row.role for _, row in rows if row.role is not None}
            spec = role_spec(ctx0, energies_of, roles, tuple(recorded))
            with torch.set_grad_enabled(kind is CallKind.GRAD):
                out, row_caps = runner.capture(latents, t, context, spec, scales)
            for j, (b, row), capture in ((j, rows[j], cap) for j, cap in zip(recorded, row_caps)):
                if row.role is Role.INV_INV:
                    source_eps = out[j : j + 1].detach() if row.supplies is not None else None
                    for other in range(count):  # every image of this inversion reads the one source pass
                        if sources[other] == sources[b] and plans[other].energies:
                            captures[other][Role.INV_INV] = capture
                            if source_eps is not None:
                                eps[other][row.supplies] = source_eps
                    if ctxs[b].state.source_cache is not None:
                        ctxs[b].state.source_cache.put(step, capture, source_eps)
                else:
                    captures[b][row.role] = capture
        for j, (b, row) in enumerate(rows):
            if row.supplies is not None and row.role is not Role.INV_INV:
                eps[b][row.supplies] = out[j : j + 1].detach()

    # 3. Per-image energies, float32 0-dim tensors; |E| ≤ atol counts as 0 (the reference's
    # allclose skip, as a mask: a masked energy contributes a zero gradient, whose γ is 1).
    energies: list[torch.Tensor | None] = [None] * count
    with torch.enable_grad():
        for b, plan in enumerate(plans):
            for guider in plan.energies:
                value = guider.energy(step, captures[b], ctxs[b].layers).float()
                value = torch.where(value.abs() > ctxs[b].config.energy_atol, value, torch.zeros_like(value))
                energies[b] = value if energies[b] is None else energies[b] + value
        active = [e for e in energies if e is not None]
        # Loss-scaled for float16 grad calls (docs/precision.md); scale 1, a plain autograd.grad, otherwise.
        # The scale that worked is carried to the next step, so an overflow is not retried every step.
        grads = None
        if active:
            loss_scale = ctx0.state.loss_scale
            if loss_scale is None:
                loss_scale = ctx0.components.precision.grad_loss_scale
            grads, loss_scale = energy_grad_to_latent(torch.stack(active).sum(), z_cur, loss_scale)  # [B, 4, h, w]
            for ctx in ctxs:
                ctx.state.loss_scale = loss_scale

    # 4. Per-image CFG, direct terms and noise rescaling.
    terms = []
    for b, ctx in enumerate(ctxs):
        guider_grad = grads[b : b + 1] if energies[b] is not None else None
        energy = energies[b].detach() if energies[b] is not None else torch.zeros((), device=z_cur.device)
        terms.append(step_terms(ctx, step, eps[b], z[b], z_star[b], guider_grad, energy))
    return terms


def fast_step(ctx: EditContext, z: torch.Tensor, z_star: torch.Tensor, step: int) -> StepTerms:
    """The terms of ``step`` for one image: :func:`batch_step` over a batch of one."""
    return batch_step([ctx], [z.float()], [z_star.float()], step)[0]
