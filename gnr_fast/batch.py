"""Edits of one or many requests: compatible edits share every UNet call (DESIGN.md §3, §8, §9).

This is the one edit path of the fast mode: :meth:`Editor.edit` is a batch of one,
:meth:`Editor.edit_batch` and the server's service hand several requests. Each request is
resolved by :func:`~gnr_fast.requests.resolve_request`; new images are inverted together (one
batched inversion per step count); edits are *compatible* when they run the same
:class:`~gnr_fast.config.EditConfig` at the same working size, and each group runs through
:func:`~gnr_fast.editing.run_edit_loop` with :func:`~gnr_fast.fast.step.batch_step`. A batched
edit equals the single edits (to float rounding of the batched kernels): batching changes
throughput, not results.

An image whose guidance turns non-finite leaves the batch with a
:class:`~gnr_fast.errors.GuidanceError`; the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .devices import synchronize
from .editing import BatchStepFunction, LoopItem, StepCallback, StepEndHook, run_edit_loop
from .errors import GnrError, InputError
from .fast.step import batch_step
from .images import decode_latent, to_output_image
from .output_types import OutputType, convert_image, decodes
from .requests import BatchRequest, EditRequest, ResolvedRequest, resolve_request
from .results import EditResult, Timings
from .session import EditSession

__all__ = ["BatchRequest", "EditRequest", "edit_batch"]


def edit_batch(
    session: EditSession,
    requests: Sequence[EditRequest],
    progress: bool = False,
    return_exceptions: bool = False,
    callback: StepCallback | None = None,
    step_fn: BatchStepFunction = batch_step,
    max_group: int | None = None,
    source_cache: bool = True,
    output_type: OutputType = "pil",
    on_step_end: StepEndHook | None = None,
) -> list[EditResult | GnrError]:
    """Run ``requests``, sharing UNet calls between compatible ones; results in request order.

    ``output_type`` (:mod:`gnr_fast.output_types`) is the type of each result's ``image``
    (``"latent"``: no VAE decode, ``image`` is ``None``); ``on_step_end`` runs after each step of
    each group's loop and may replace its latents or stop it (``Editor.edit``'s
    ``callback_on_step_end``, one request).

    Each :class:`EditResult` reports its own inversion and decoding time, and the editing time,
    UNet calls and rows of the group it ran in, with ``batch_size`` = the number of edits that
    shared those calls. With ``return_exceptions`` a request that fails (bad input, non-finite
    guidance) yields its :class:`GnrError` in its slot and the others still run; otherwise the
    first failure is raised. ``step_fn`` is the fast batch step unless a mode supplies another
    (the reference mode runs groups of one, ``max_group=1``, without the inversions' source cache,
    ``source_cache=False``); ``callback`` runs after each step of each image.
    """
    if isinstance(requests, EditRequest) or not isinstance(requests, Sequence):
        raise InputError(f"requests must be a list of BatchRequest, got {type(requests).__name__}")
    results: list = [None] * len(requests)
    resolved: list[ResolvedRequest] = []
    for index, request in enumerate(requests):
        try:
            resolved.append(resolve_request(session, request, index if len(requests) > 1 else None))
            resolved[-1].index = index
        except GnrError as exc:
            if not return_exceptions:
                raise
            results[index] = exc
    for index, error in _invert_images(session, resolved, progress):
        if not return_exceptions:
            raise error
        results[index] = error
    groups: dict[tuple, list[ResolvedRequest]] = {}
    for item in resolved:
        if item.inversion is not None:
            key = (item.config, tuple(item.inversion.latents.shape[1:]))
            groups.setdefault(key, []).append(item)
    for group in groups.values():
        size = max_group or len(group)
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            outcomes = _run_group(session, chunk, step_fn, progress, callback, source_cache, output_type, on_step_end)
            for item, outcome in zip(chunk, outcomes):
                if isinstance(outcome, GnrError) and not return_exceptions:
                    raise outcome
                results[item.index] = outcome
    return results


def _invert_images(session: EditSession, resolved: list[ResolvedRequest], progress: bool) -> list[tuple[int, GnrError]]:
    """Invert the images of ``resolved`` (one batched inversion per step count); the failures."""
    by_steps: dict[int, list[ResolvedRequest]] = {}
    for item in resolved:
        if item.inversion is None:
            by_steps.setdefault(item.config.num_steps, []).append(item)
    failures = []
    for num_steps, group in by_steps.items():
        start = time.perf_counter()
        try:
            inversions = session.invert_prepared([p.image for p in group], [p.source_prompt for p in group], num_steps, progress)
            synchronize(session.components.device)
        except GnrError as exc:
            failures.extend((p.index, exc) for p in group)
            continue
        seconds = time.perf_counter() - start
        for item, inversion in zip(group, inversions):
            item.inversion, item.image, item.inversion_s = inversion, None, seconds
    return failures


@dataclass(eq=False)
class _Counts:
    calls: int
    rows: int


def _run_group(
    session: EditSession,
    group: list[ResolvedRequest],
    step_fn: BatchStepFunction,
    progress: bool,
    callback: StepCallback | None,
    source_cache: bool,
    output_type: OutputType = "pil",
    on_step_end: StepEndHook | None = None,
) -> list[EditResult | GnrError]:
    """The edit loop over a group of compatible requests; then decode each image (unless ``output_type``
    is ``"latent"``)."""
    components, runner = session.components, session.runner
    items = []
    for item in group:
        ctx = session.context(item.config, item.inversion.source_prompt, item.request.target_prompt)
        if source_cache:
            ctx.state.source_cache = session.source_cache.cache_for(item.inversion, ctx)
        items.append(LoopItem(ctx, item.inversion.latents.to(components.device).float(), source=id(item.inversion)))
    before = _Counts(runner.calls, runner.rows)
    start = time.perf_counter()
    outcomes = run_edit_loop(items, step_fn, progress=progress, callback=callback, on_step_end=on_step_end)
    synchronize(components.device)  # CUDA runs asynchronously: wait for the loop's kernels before reading the clock
    editing_s = time.perf_counter() - start
    calls, rows = runner.calls - before.calls, runner.rows - before.rows
    results: list[EditResult | GnrError] = []
    for item, outcome in zip(group, outcomes):
        if isinstance(outcome, GnrError):
            results.append(outcome)
            continue
        image, decoding_s = None, 0.0
        if decodes(output_type):
            start = time.perf_counter()
            array = decode_latent(components.vae, outcome, components.scaling_factor)[0]  # on the host: synchronised
            stats = item.inversion.pixel_stats if item.config.match_colors else None
            array = items[0].ctx.sampler.finish_image(array, stats)  # consistency: colour match
            image = convert_image(to_output_image(array, item.inversion.original_size), output_type)
            decoding_s = time.perf_counter() - start
        timings = Timings(inversion_s=item.inversion_s, editing_s=editing_s, decoding_s=decoding_s)
        results.append(EditResult(
            image=image,
            latents=outcome.detach().clone(),
            inversion=item.inversion,
            timings=timings,
            unet_calls=calls,
            unet_rows=rows,
            batch_size=len(group),
            config=item.config,
        ))
    return results
