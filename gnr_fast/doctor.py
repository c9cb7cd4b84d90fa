"""``gnr-fast doctor``: which runtime backends (every one the registry lists) and kernel implementations work here, and why not.

Each check is a pure function returning a :class:`Check`; nothing is loaded beyond what a check
needs to answer (packages are found with ``importlib.util.find_spec`` and imported only when
their version or providers are reported). Users paste the report into bug reports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from .runtime.config import RuntimeConfig
from .runtime.registry import BACKENDS, BackendSpec

Kind = Literal["runtime", "kernel", "environment"]


@dataclass(frozen=True)
class Check:
    """One line of the report: ``name`` is available here or not, ``detail`` says what was found
    (version, providers) or, when unavailable, why and what to do."""

    kind: Kind
    name: str
    available: bool
    detail: str


def _version(module: str) -> str:
    """``module.__version__`` (imports the module; callers have found it first)."""
    return str(getattr(importlib.import_module(module), "__version__", "unknown version"))


def _found(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- runtime backends --------------------------------------------------------------------------


def check_backend(spec: BackendSpec) -> Check:
    """The line of one registered backend: its own availability rule
    (:attr:`~gnr_fast.runtime.registry.BackendSpec.unavailable_reason`) on this host's default
    device (CUDA when visible, else CPU) with the default :class:`RuntimeConfig`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = spec.why_unavailable(device, RuntimeConfig())
    if reason is not None:
        return Check("runtime", spec.name, False, reason)
    return Check("runtime", spec.name, True, spec.describe())


def runtime_checks() -> list[Check]:
    """One line per backend of :data:`gnr_fast.runtime.registry.BACKENDS`, in registry order."""
    return [check_backend(spec) for spec in BACKENDS.values()]


# --- kernel implementations ----------------------------------------------------------------------


def check_native_cpu() -> Check:
    from gnr_fast.ops import native

    reason = native.native_unavailable_reason()
    if reason is not None:
        return Check("kernel", "native CPU ops", False, f"{reason}; the pure-torch paths are used")
    lanes = native.vector_lanes()
    threads, wanted = native.parallel_threads(), torch.get_num_threads()
    return Check("kernel", "native CPU ops", True,
                 f"gnr_fast_native from {native.library_path()} ({lanes}-lane vectors: built for "
                 f"{'AVX-512' if lanes == 16 else 'AVX2 or older'}; loops on {threads} of torch's {wanted} threads)")


def check_triton() -> Check:
    if not _found("triton"):
        return Check("kernel", "triton", False, "triton is not installed (pip install 'gnr-fast[kernels]')")
    version = _version("triton")
    if not torch.cuda.is_available():
        return Check("kernel", "triton", False, f"triton {version} is installed but no CUDA GPU is visible (kernels run on CPU only under TRITON_INTERPRET=1, for tests)")
    return Check("kernel", "triton", True, f"triton {version}")


def check_xformers() -> Check:
    if not _found("xformers"):
        return Check("kernel", "xformers", False, "xformers is not installed (optional; CUDA only)")
    if not torch.cuda.is_available():
        return Check("kernel", "xformers", False, "xformers is installed but no CUDA GPU is visible")
    return Check("kernel", "xformers", True, f"xformers {_version('xformers')}")


def check_cuda() -> Check:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)
    toolkit = f"nvcc at {nvcc}" if nvcc else "no nvcc"
    if torch.version.cuda is None:
        return Check("kernel", "cuda", False, f"this torch ({torch.__version__}) is a CPU build; {toolkit}")
    if not torch.cuda.is_available():
        return Check("kernel", "cuda", False, f"torch has CUDA {torch.version.cuda} but no GPU is visible; {toolkit}")
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return Check("kernel", "cuda", True, f"CUDA {torch.version.cuda}: {names}; {toolkit}")


CHECKS: tuple[Callable[[], Check], ...] = (check_native_cpu, check_triton, check_xformers, check_cuda)
"""The kernel checks; the runtime lines come from the backend registry (:func:`runtime_checks`)."""


def run_checks() -> list[Check]:
    """One line naming the platform, one per registered backend, then every check of :data:`CHECKS`."""
    env = Check("environment", "platform", True, f"Python {platform.python_version()}, {platform.platform()}, torch threads {torch.get_num_threads()}")
    return [env, *runtime_checks(), *(check() for check in CHECKS)]


def format_report(checks: list[Check]) -> str:
    """One aligned line per check: ``kind  name  yes/no  detail``."""
    width = max(len(c.name) for c in checks)
    lines = [f"{c.kind:<11} {c.name:<{width}}  {'yes' if c.available else 'no ':<3}  {c.detail}" for c in checks]
    return "\n".join(lines)


def report_json(checks: list[Check]) -> str:
    return json.dumps([asdict(c) for c in checks], indent=2)
