"""Finding and importing the Triton kernel modules of ``kernels/`` (installed as ``gnr_fast.kernels``).

``@triton.jit`` decides when a kernel module is imported whether it builds GPU or interpreted
(``TRITON_INTERPRET=1``) kernels, so :func:`kernel_module` keeps one instance per setting.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

KERNEL_PACKAGE = "gnr_fast.kernels"
_modules: dict[tuple[str, bool], ModuleType] = {}


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package can be imported here (looked up once per process: every op
    call on every device asks, and ``find_spec`` stats the file system, ≈ 75 µs a call)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` is in effect (kernels then run on CPU tensors)."""
    if not triton_importable():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def interpreter_ready() -> bool:
    """True when triton.language was imported under the interpreter. Its own helpers (``tl.zeros``,
    ``tl.sum``, ...) are ``@triton.jit`` functions built at import, and interpreted kernels can
    only call interpreted helpers."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@functools.cache
def kernel_module_present(name: str) -> bool:
    """True when ``gnr_fast.kernels.<name>`` can be found (it ships in the package; looked up once
    per process and name)."""
    return importlib.util.find_spec(f"{KERNEL_PACKAGE}.{name}") is not None


def kernel_module(name: str) -> ModuleType:
    """``gnr_fast.kernels.<name>`` imported for the current ``TRITON_INTERPRET`` setting (callers
    check :func:`kernel_module_present` and :func:`triton_importable` first)."""
    interpreted = triton_interpreting()
    key = (name, interpreted)
    if key not in _modules:
        spec = importlib.util.find_spec(f"{KERNEL_PACKAGE}.{name}")
        assert spec is not None and spec.origin is not None, name
        module_name = f"{KERNEL_PACKAGE}.{name}_{'interpreted' if interpreted else 'compiled'}"
        own_spec = importlib.util.spec_from_file_location(module_name, spec.origin)
        assert own_spec is not None and own_spec.loader is not None, spec.origin
        module = importlib.util.module_from_spec(own_spec)
        sys.modules[module_name] = module
        own_spec.loader.exec_module(module)
        _modules[key] = module
    return _modules[key]


def launch_unsupported_reason(name: str, tensor: Tensor, allow_interpreter: bool = False) -> str | None:
    """Why the kernels of ``gnr_fast.kernels.<name>`` cannot be launched on ``tensor``'s device, or
    ``None`` when they can: triton importable, the kernel module shipped, a CUDA tensor (a CPU tensor
    only with ``allow_interpreter`` while ``TRITON_INTERPRET=1`` is in effect from triton's first
    import). Each op adds its own dtype and shape conditions."""
    if not triton_importable():
        return "triton is not installed (pip install 'gnr-fast[kernels]')"
    if not kernel_module_present(name):
        return f"the kernel module {KERNEL_PACKAGE}.{name} is missing (a broken install: reinstall gnr-fast)"
    if tensor.device.type == "cpu":
        if not allow_interpreter:
            return "tensors are on the CPU; the Triton kernels run on CUDA (on CPU only forced, under TRITON_INTERPRET=1)"
        if not triton_interpreting():
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        if not interpreter_ready():
            return (
                "TRITON_INTERPRET=1 was set after triton.language had been imported in compiled mode; "
                "set it before the first import of triton (e.g. in the environment)"
            )
    elif tensor.device.type != "cuda":
        return f"tensors are on {tensor.device.type}; the Triton kernels run on CUDA"
    elif triton_interpreting() or interpreter_ready():
        return "TRITON_INTERPRET=1 is (or was, when triton was imported) set; interpreted kernels take CPU tensors only"
    return None
