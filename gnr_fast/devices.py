"""Device hygiene for CUDA (docs/precision.md §6): the current device, synchronisation, out-of-memory.

Everything here is a no-op or a plain call on CPU, so callers use it unconditionally:

* :func:`on_device` — makes ``device`` the current CUDA device of this thread (kernel launches and
  allocations without an explicit index go there; ``cuda:1`` otherwise launches on ``cuda:0``);
* :func:`synchronize` — waits for the device's queued work, so wall-clock phase timings are true;
* :func:`retry_on_oom` — runs a batch; on ``torch.OutOfMemoryError`` it releases memory and runs
  the items one by one, turning an item that still does not fit into a :class:`DeviceOutOfMemoryError`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

import torch

from .errors import DeviceOutOfMemoryError, GnrError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def on_device(device: torch.device | str) -> AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device, else a context that does nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has finished its queued work (CUDA, MPS); nothing to wait for on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_memory(device: torch.device | str) -> None:
    """Collect garbage and return the caching allocator's free blocks of ``device`` to the driver."""
    gc.collect()
    if torch.device(device).type == "cuda":
        with on_device(device):
            torch.cuda.empty_cache()


def retry_on_oom(
    run: Callable[[Sequence[T]], list[R]],
    items: Sequence[T],
    device: torch.device | str,
    drop_caches: Callable[[], None] = lambda: None,
    describe: Callable[[T], str] = lambda item: "an item",
) -> list[R | GnrError]:
    """``run(items)``; if it raises ``torch.OutOfMemoryError``, ``run([item])`` for each item.

    Before the single retries, ``drop_caches()`` frees what the caller can rebuild (e.g. source
    caches of inversions) and :func:`release_memory` empties the allocator. An item that runs
    out of memory on its own becomes a :class:`DeviceOutOfMemoryError` in its place in the result
    (naming ``describe(item)``, the device and what to change), so the other items still finish.
    ``run`` returns one result per item, in order; its results pass through unchanged.
    """
    try:
        return list(run(items))
    except torch.OutOfMemoryError:
        logger.warning("out of memory on %s with a batch of %d; dropping caches and retrying singly", device, len(items))
    drop_caches()
    release_memory(device)
    results: list[R | GnrError] = []
    for item in items:
        try:
            results.extend(run([item]))
        except torch.OutOfMemoryError as exc:
            release_memory(device)
            error = DeviceOutOfMemoryError(
                f"{describe(item)} does not fit in the memory of {device} even alone (batch of {len(items)} retried "
                "one by one); use a smaller image (max_pixels), dtype=torch.float16, a smaller source_cache_mb, or a "
                f"device with more memory ({exc})"
            )
            error.__cause__ = exc
            results.append(error)
    return results
