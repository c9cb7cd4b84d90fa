"""How an op picks its implementation and says so: one log line per distinct choice.

Every op in this package decides its path (Triton, native C++, torch, ...) with
:func:`choose_path`, from named predicates that return the reason a path cannot run (``None`` when
it can), never by catching an exception.
The choice is logged at INFO on the op's own logger the first time each (op, path, reason)
occurs in the process, so a user sees once which kernel runs and why the faster one does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from gnr_fast.errors import BackendUnavailableError

_logged: set[tuple[str, str, str]] = set()


def log_choice(logger: logging.Logger, op: str, path: str, why: str) -> str:
    """Log ``"<op> uses the <path> path (<why>)"`` on ``logger`` the first time this triple
    occurs (not while torch.compile traces: a logging call would break its graph); return ``path``."""
    key = (op, path, why)
    # is_compiling() first: dynamo must not read the shared set while tracing (it would guard on its
    # contents, and a choice logged later by another op would force a recompile).
    if not torch.compiler.is_compiling() and key not in _logged:
        _logged.add(key)
        logger.info("%s uses the %s path (%s)", op, path, why)
    return path


def forget_logged_choices() -> None:
    """Log every choice again from now on (tests that check the log line; a process that
    changed its environment, e.g. loaded the native library)."""
    _logged.clear()


PathReason = Callable[[bool], "str | None"]
"""``forced -> why a path cannot take the op's tensors, or None``; ``forced`` is true when the
caller named that path (e.g. Triton then takes CPU tensors under ``TRITON_INTERPRET=1``)."""


def choose_path(
    logger: logging.Logger,
    op: str,
    backend: str,
    paths: Sequence[tuple[str, PathReason]],
    fallback: str = "torch",
) -> str:
    """The implementation an op runs: the one chooser of every op in this package.

    ``paths`` are the op's kernels in order of preference, each with its named predicate;
    ``fallback`` (the pure-torch path) always runs. ``backend="auto"`` takes the first path whose
    reason is ``None``, else the fallback; a path's own name (or the fallback's) forces it. The
    choice and why are logged once by :func:`log_choice` (the reasons of the paths passed over).

    Raises:
        BackendUnavailableError: a forced path cannot run, naming why.
    """
    if backend == fallback:
        return log_choice(logger, op, fallback, f"backend={fallback!r}")
    passed_over: list[str] = []
    for name, reason_of in paths:
        if backend not in ("auto", name):
            continue
        reason = reason_of(backend == name)
        if reason is None:
            why = f"backend={name!r}" if backend == name else "; ".join(passed_over) or "supported"
            return log_choice(logger, op, name, why)
        if backend == name:
            raise BackendUnavailableError(f"{op}: backend={name!r} is unavailable: {reason}")
        passed_over.append(f"{name}: {reason}")
    return log_choice(logger, op, fallback, "; ".join(passed_over))
