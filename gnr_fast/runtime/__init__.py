"""UNet execution backends behind two calling conventions (STYLE.md §10, DESIGN.md §9).

* plain ``(latents, timestep, context) -> eps`` — :class:`PlainRunner`;
* capturing ``(latents, timestep, context, spec) -> (eps, outputs)`` — :class:`CapturingRunner`.

Every backend has one :class:`BackendSpec` in :mod:`gnr_fast.runtime.registry` (its runners'
factories, availability rule and options) and one module holding its runners (``eager``,
``compiled``, ``onnx``, ``tensorrt``). :class:`RuntimeConfig` names the backend of each
convention; :class:`UNetExecutor` builds the runners, dispatches and counts every call.
"""

from .backends import CapturingRunner, PlainRunner, make_capturing_runner, make_plain_runner
from .calls import CallKind
from .compiled import CompiledCapturingRunner, CompiledPlainRunner, inductor_unavailable_reason
from .config import RuntimeConfig, runtime_names
from .eager import EagerCapturingRunner, EagerPlainRunner
from .executor import UNetExecutor
from .options import BackendOption
from .registry import BACKENDS, BackendSpec, backend_names, backend_spec, register_backend

__all__ = [
    "BACKENDS",
    "BackendOption",
    "BackendSpec",
    "CallKind",
    "CapturingRunner",
    "CompiledCapturingRunner",
    "CompiledPlainRunner",
    "EagerCapturingRunner",
    "EagerPlainRunner",
    "PlainRunner",
    "RuntimeConfig",
    "UNetExecutor",
    "backend_names",
    "backend_spec",
    "inductor_unavailable_reason",
    "make_capturing_runner",
    "make_plain_runner",
    "register_backend",
    "runtime_names",
]
