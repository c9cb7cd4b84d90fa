"""How an op picks its implementation and says so: one log line per distinct choice.

Every op in this package decides its path (Triton, native C++, torch, ...) by named predicates
that return the reason a path cannot run (``None`` when it can), never by catching an exception.
The choice is logged at INFO on the op's own logger the first time each (op, path, reason)
occurs in the process, so a user sees once which kernel runs and why the faster one does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

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


def triton_or_torch(
    logger: logging.Logger,
    op: str,
    backend: str,
    triton_unsupported_reason: Callable[[bool], str | None],
) -> Literal["triton", "torch"]:
    """The path of an op that has a Triton kernel and a torch reference.

    ``backend`` is ``"auto"``, ``"torch"`` or ``"triton"``; ``triton_unsupported_reason(allow_interpreter)``
    says why the kernel cannot take the op's tensors (``allow_interpreter`` is true only when
    Triton is forced, so CPU tensors take it under ``TRITON_INTERPRET=1``). ``"auto"`` takes
    Triton when the reason is ``None``. The choice is logged by :func:`log_choice`.

    Raises:
        BackendUnavailableError: ``backend="triton"`` and the kernel cannot run, naming why.
    """
    if backend == "torch":
        log_choice(logger, op, "torch", "backend='torch'")
        return "torch"
    reason = triton_unsupported_reason(backend == "triton")
    if reason is None:
        log_choice(logger, op, "triton", "supported")
        return "triton"
    if backend == "triton":
        raise BackendUnavailableError(f"{op}: backend='triton' is unavailable: {reason}")
    log_choice(logger, op, "torch", f"Triton: {reason}")
    return "torch"
