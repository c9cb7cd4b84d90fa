"""UNet execution backends behind two calling conventions (STYLE.md §10, DESIGN.md §9).

* plain ``(latents, timestep, context) -> eps`` — :class:`PlainRunner`;
* capturing ``(latents, timestep, context, spec) -> (eps, outputs)`` — :class:`CapturingRunner`.

:class:`RuntimeConfig` names the backend of each; :func:`make_plain_runner` /
:func:`make_capturing_runner` build them from the registry; :class:`UNetExecutor` dispatches and
counts every call.
"""

from .backends import (
    CAPTURING_BACKENDS,
    PLAIN_BACKENDS,
    CapturingRunner,
    PlainRunner,
    make_capturing_runner,
    make_plain_runner,
)
from .compiled import (
    CompiledCapturingRunner,
    CompiledPlainRunner,
    inductor_unavailable_reason,
)
from .config import RUNTIME_NAMES, RUNTIME_PRESETS, RuntimeConfig
from .eager import EagerCapturingRunner, EagerPlainRunner
from .executor import CallKind, UNetExecutor

__all__ = [
    "CAPTURING_BACKENDS",
    "PLAIN_BACKENDS",
    "RUNTIME_NAMES",
    "RUNTIME_PRESETS",
    "CallKind",
    "CapturingRunner",
    "CompiledCapturingRunner",
    "CompiledPlainRunner",
    "EagerCapturingRunner",
    "EagerPlainRunner",
    "PlainRunner",
    "RuntimeConfig",
    "UNetExecutor",
    "inductor_unavailable_reason",
    "make_capturing_runner",
    "make_plain_runner",
]
