"""Finding and importing the Triton kernel modules of ``kernels/`` (installed as ``gnr_fast.kernels``).

``@triton.jit`` decides when a kernel module is imported whether it builds GPU or interpreted
(``TRITON_INTERPRET=1``) kernels, so :func:`kernel_module` keeps one instance per setting.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

KERNEL_PACKAGE = "gnr_fast.kernels"
_modules: dict[tuple[str, bool], ModuleType] = {}


def triton_importable() -> bool:
    """True when the ``triton`` package can be imported here."""
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


def kernel_module_present(name: str) -> bool:
    """True when ``gnr_fast.kernels.<name>`` can be found (it ships in the package)."""
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
