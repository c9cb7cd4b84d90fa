"""Batched edits: concurrent edits of the same shape share every UNet call (DESIGN.md §3, §8).

Edits are *compatible* when they run the same :class:`~gnr_fast.config.EditConfig` (hence the
same steps, guiders and schedules) at the same working size. For a group of compatible edits,
each step runs

* one no-grad call holding every image's no-grad rows (ε_u, the CFG pass, the source pass
  ``inv_inv`` unless cached — once per distinct inversion), and
* one grad call holding every image's grad rows (``cur_inv``, ``cur_trg``),

with one :class:`~gnr_fast.attention.capture.PassCapture` per row, recording only that row. The
energies, the |E| ≤ atol skip and the noise rescaling γ are computed per image. One backward of
Σ_b E_b gives every image's gradient at once: UNet rows do not interact (group norm and attention
are per sample), so row b of ∂(Σ_b E_b)/∂z is ∂E_b/∂z_b. All latents then take one DDIM step
together. A batched edit therefore equals the single edits (to float rounding of the batched
kernels): batching changes throughput, not results.

An image whose guidance turns non-finite leaves the batch with a
:class:`~gnr_fast.errors.GuidanceError`; the others go on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from .attention.capture import PassCapture
from .config import EditConfig, Role
from .editing import EditContext, StepTerms, source_latent
from .errors import GnrError, GuidanceError, InputError
from .fast.plan import Latent, Row, StepPlan, plan_step
from .fast.step import prompt_embedding, row_capture, step_terms
from .guiders import guider_energy
from .images import ImageInput, PreparedImage, decode_latent, prepare_image, to_output_image
from .inversion import Inversion
from .prompts import check_prompt
from .schedules import ddim_step_down

if TYPE_CHECKING:
    from .editor import EditResult, Editor


@dataclass(frozen=True, eq=False)
class BatchRequest:
    """One edit of a batch; the fields mean what the arguments of :meth:`Editor.edit` mean."""

    source: ImageInput | Inversion  # an image (inverted first) or an inversion of one
    target_prompt: str
    source_prompt: str | None = None  # required with an image; must match an inversion's
    preset: str | None = None  # None: the editor's default_preset (the model's gnr_fast.json)
    config: EditConfig | str | Path | None = None  # overrides preset
    num_steps: int | None = None


@dataclass(eq=False)
class _Item:
    """A resolved request moving through the batch."""

    index: int  # position in the request list
    inversion: Inversion
    ctx: EditContext
    latents: torch.Tensor  # [N + 1, 1, 4, h, w] the trajectory on the editor's device and dtype
    z: torch.Tensor  # [1, 4, h, w] current latent
    inversion_s: float = 0.0

    def z_star(self, step: int) -> torch.Tensor:
        return source_latent(self.latents, step, self.ctx.config)  # [1, 4, h, w]

    @property
    def group(self) -> tuple:
        """Items with equal groups can share UNet calls."""
        return (self.ctx.config, tuple(self.z.shape), self.z.dtype)


def edit_batch(
    editor: "Editor",
    requests: Sequence[BatchRequest],
    progress: bool = False,
    return_exceptions: bool = False,
) -> "list[EditResult | GnrError]":
    """Run ``requests`` as fast-mode edits, sharing UNet calls between compatible ones.

    Results come in request order. Each :class:`EditResult` reports its own inversion and
    decoding time, and the editing time and UNet calls of the group it ran in (shared by the
    group's images). With ``return_exceptions`` a request that fails (bad input, non-finite
    guidance) yields its :class:`GnrError` in its slot and the others still run; otherwise the
    first failure is raised.
    """
    if isinstance(requests, BatchRequest) or not isinstance(requests, Sequence):
        raise InputError(f"requests must be a list of BatchRequest, got {type(requests).__name__}")
    results: list = [None] * len(requests)
    pending: list[_Pending] = []
    for index, request in enumerate(requests):
        try:
            pending.append(_validate(editor, index, request))
        except GnrError as exc:
            if not return_exceptions:
                raise
            results[index] = exc
    for failure in _invert_images(editor, pending, progress):
        if not return_exceptions:
            raise failure.error
        results[failure.index] = failure.error
    items = [_item(editor, p) for p in pending if p.inversion is not None]
    groups: dict[tuple, list[_Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    for group in groups.values():
        for item, outcome in zip(group, _run_group(editor, group, progress)):
            if isinstance(outcome, GnrError) and not return_exceptions:
                raise outcome
            results[item.index] = outcome
    return results


@dataclass(eq=False)
class _Pending:
    """A validated request whose image may still have to be inverted."""

    index: int
    request: BatchRequest
    config: EditConfig
    inversion: Inversion | None = None
    image: PreparedImage | None = None  # set while the inversion is still to be computed
    inversion_s: float = 0.0


@dataclass(frozen=True)
class _Failure:
    index: int
    error: GnrError


def _validate(editor: "Editor", index: int, request: BatchRequest) -> _Pending:
    """Check ``request`` and resolve its config; read its image when it has no inversion yet."""
    if not isinstance(request, BatchRequest):
        raise InputError(f"requests[{index}] must be a BatchRequest, got {type(request).__name__}")
    check_prompt(request.target_prompt, "target_prompt")
    if isinstance(request.source, Inversion):
        inversion = request.source
        if request.source_prompt is not None and request.source_prompt != inversion.source_prompt:
            raise InputError(
                f"requests[{index}].source_prompt {request.source_prompt!r} differs from its inversion's "
                f"{inversion.source_prompt!r}; omit source_prompt or invert again"
            )
        steps = inversion.num_steps if request.num_steps is None else request.num_steps
        config = editor.resolve_config(request.preset, request.config, steps)
        inversion.check_compatible(editor.model_id, config.num_steps)
        return _Pending(index, request, config, inversion=inversion)
    if request.source_prompt is None:
        raise InputError(f"requests[{index}].source_prompt is required when editing an image")
    check_prompt(request.source_prompt, f"requests[{index}].source_prompt")
    config = editor.resolve_config(request.preset, request.config, request.num_steps)
    return _Pending(index, request, config, image=prepare_image(request.source, max_pixels=editor.max_pixels))


def _invert_images(editor: "Editor", pending: list[_Pending], progress: bool) -> list[_Failure]:
    """Invert the images of ``pending`` (one batched inversion per step count); the failures."""
    by_steps: dict[int, list[_Pending]] = {}
    for p in pending:
        if p.inversion is None:
            by_steps.setdefault(p.config.num_steps, []).append(p)
    failures = []
    for num_steps, group in by_steps.items():
        prompts = [p.request.source_prompt for p in group]
        start = time.perf_counter()
        try:
            inversions = editor.invert_prepared([p.image for p in group], prompts, num_steps, progress)
        except GnrError as exc:
            failures.extend(_Failure(p.index, exc) for p in group)
            continue
        seconds = time.perf_counter() - start
        for p, inversion in zip(group, inversions):
            p.inversion, p.image, p.inversion_s = inversion, None, seconds
    return failures


def _item(editor: "Editor", pending: _Pending) -> _Item:
    """The edit context and starting latent of a request with its inversion."""
    inversion = pending.inversion
    components = editor.components
    ctx = EditContext.build(
        components,
        editor.runner,
        pending.config,
        editor.self_attn_layers,
        c_uncond=editor.embed(""),
        c_src=editor.embed(inversion.source_prompt),
        c_trg=editor.embed(pending.request.target_prompt),
    )
    ctx.source_cache = editor._source_cache(inversion, ctx)
    latents = inversion.latents.to(components.device, components.dtype)
    return _Item(index=pending.index, inversion=inversion, ctx=ctx, latents=latents, z=latents[-1].clone(),
                 inversion_s=pending.inversion_s)


def _run_group(editor: "Editor", items: list[_Item], progress: bool) -> "list[EditResult | GnrError]":
    """The edit loop (DESIGN.md §3) over a group of compatible items; then decode each image."""
    from .editor import EditResult, Timings

    ctx0 = items[0].ctx
    schedule = ctx0.components.schedule
    outcomes: dict[int, EditResult | GnrError] = {}
    live = list(items)
    calls_before = editor.runner.calls
    start = time.perf_counter()
    for step, t in enumerate(tqdm(ctx0.timesteps, desc=f"Editing ×{len(items)}", disable=not progress, leave=False)):
        terms = batch_step([it.ctx for it in live], [it.z for it in live], [it.z_star(step) for it in live], step,
                           sources=[id(it.inversion) for it in live])
        kept = []
        for item, term in zip(live, terms):
            if torch.isfinite(term.eps_final).all() and math.isfinite(term.gamma):
                kept.append((item, term))
            else:
                outcomes[item.index] = GuidanceError(
                    f"step {step} (t={t}) produced non-finite noise (energy={term.energy}, gamma={term.gamma}); "
                    "lower the guider scales or check the model"
                )
        if not kept:
            live = []
            break
        live = [item for item, _ in kept]
        with torch.no_grad():
            eps_final = torch.cat([term.eps_final for _, term in kept])  # [B, 4, h, w]
            z = ddim_step_down(schedule, eps_final, t, torch.cat([item.z for item in live]), ctx0.config.num_steps)
        for b, item in enumerate(live):
            item.z = z[b : b + 1]
    editing_s = time.perf_counter() - start
    unet_calls = editor.runner.calls - calls_before
    components = ctx0.components
    for item in live:
        start = time.perf_counter()
        array = decode_latent(components.vae, item.z, components.scaling_factor)[0]
        image = to_output_image(array, item.inversion.original_size)
        timings = Timings(inversion_s=item.inversion_s, editing_s=editing_s, decoding_s=time.perf_counter() - start)
        outcomes[item.index] = EditResult(
            image=image,
            latents=item.z.detach().clone(),
            inversion=item.inversion,
            timings=timings,
            unet_calls=unet_calls,
            config=item.ctx.config,
        )
    return [outcomes[item.index] for item in items]


def batch_step(
    ctxs: Sequence[EditContext],
    z: Sequence[torch.Tensor],
    z_star: Sequence[torch.Tensor],
    step: int,
    sources: Sequence[object] | None = None,
) -> list[StepTerms]:
    """The noise terms of ``step`` for several images (each [1, 4, h, w]) with shared UNet calls.

    ``ctxs`` must share the config, the runner and the selected layers. ``sources`` names each
    image's inversion (equal names: the same inversion, whose source pass then runs once);
    by default every image has its own.
    """
    count = len(ctxs)
    sources = list(range(count)) if sources is None else list(sources)
    ctx0 = ctxs[0]
    t = ctx0.timesteps[step]

    # 1. One plan per image; one source-cache lookup per distinct inversion.
    cached: dict[object, PassCapture | None] = {}
    plans: list[StepPlan] = []
    for ctx, zb, zs, source in zip(ctxs, z, z_star, sources):
        if source not in cached:
            cached[source] = ctx.source_cache.get(step, zb.dtype) if ctx.source_cache is not None else None
        plans.append(plan_step(ctx.config, step, source_cached=cached[source] is not None,
                               energies_vanish=torch.equal(zb, zs)))
    captures: list[dict[Role, PassCapture]] = [{} for _ in range(count)]
    for b, plan in enumerate(plans):
        if cached[sources[b]] is not None and plan.energies:
            captures[b][Role.INV_INV] = cached[sources[b]]

    # 2. One no-grad call and one grad call over every image's rows.
    z_grad = torch.cat([zb.detach() for zb in z]).requires_grad_(True)  # [B, 4, h, w]
    eps: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    fresh_sources: dict[tuple, tuple[int, PassCapture]] = {}  # (source, energies) -> (image, its inv_inv capture)
    for grad in (False, True):
        rows: list[tuple[int, Row]] = []
        for b, plan in enumerate(plans):
            for call in plan.calls:
                if call.grad != grad:
                    continue
                for row in call.rows:
                    shared = fresh_sources.get((sources[b], plan.energies))
                    if row.role is Role.INV_INV and shared is not None:
                        captures[b][Role.INV_INV] = shared[1]
                        continue
                    rows.append((b, row))
                    if row.role is Role.INV_INV:
                        fresh_sources[(sources[b], plan.energies)] = (b, row_capture(ctxs[b], plan, row.role, len(rows) - 1))
                        captures[b][Role.INV_INV] = fresh_sources[(sources[b], plan.energies)][1]
        if not rows:
            continue
        call_captures = []
        for j, (b, row) in enumerate(rows):
            if row.role is Role.INV_INV:
                call_captures.append(captures[b][Role.INV_INV])
            elif row.role is not None:
                captures[b][row.role] = row_capture(ctxs[b], plans[b], row.role, j)
                call_captures.append(captures[b][row.role])
        latents = torch.cat([
            (z_grad[b : b + 1] if grad else z[b].detach()) if row.latent is Latent.CUR else z_star[b] for b, row in rows
        ])  # [R, 4, h, w]
        context = torch.cat([prompt_embedding(ctxs[b], row.prompt) for b, row in rows])  # [R, 77, C]
        with torch.set_grad_enabled(grad):
            out = ctx0.runner(latents, t, context, tuple(call_captures))  # [R, 4, h, w]
        for j, (b, row) in enumerate(rows):
            if row.supplies is not None:
                eps[b][row.supplies] = out[j : j + 1].detach()
    for b, capture in fresh_sources.values():
        if ctxs[b].source_cache is not None:
            ctxs[b].source_cache.put(step, capture)

    # 3. Per-image energies (with the reference's |E| ≤ atol skip), one backward for all.
    energies: list[torch.Tensor | None] = [None] * count
    with torch.enable_grad():
        for b, plan in enumerate(plans):
            for guider in plan.energies:
                value = guider_energy(guider, step, captures[b], ctxs[b].layers)
                if abs(float(value.detach())) > ctxs[b].config.energy_atol:
                    energies[b] = value if energies[b] is None else energies[b] + value
        active = [e for e in energies if e is not None]
        grads = torch.autograd.grad(sum(active), z_grad)[0] if active else None  # [B, 4, h, w]

    # 4. Per-image CFG, direct terms and noise rescaling.
    terms = []
    for b, ctx in enumerate(ctxs):
        guider_grad = grads[b : b + 1] if energies[b] is not None else None
        energy = 0.0 if energies[b] is None else float(energies[b].detach())
        terms.append(step_terms(ctx, step, eps[b], z[b], z_star[b], guider_grad, energy))
    return terms
