"""The native (C++) ops of ``csrc/``: finding and loading the library, fake kernels, typed wrappers.

The library is built by ``pip install -e .`` (setup.py's ``build_ext`` runs the top-level
``CMakeLists.txt``) into ``gnr_fast/_native<EXT_SUFFIX>``, or by ``cmake -S . -B build &&
cmake --build build`` into ``build/libgnr_fast_native.so``, which ``GNR_FAST_NATIVE_LIB`` points
to. It registers, in the ``gnr_fast_native`` namespace (float32 CPU tensors; contracts below):

- ``attn_map_energy_fwd(q, k, q_ref, k_ref, lse_ref, scale, with_grad, block_rows)``
  → ``(row_sq, row_dot, dq_sum, dk_sum)``
- ``attn_map_energy_bwd(q, k, q_ref, k_ref, lse_ref, row_dot, scale, block_rows)`` → ``(dq_sum, dk_sum)``
- ``attention_lse(q, k, scale, block_rows)`` → ``lse``
- ``vector_lanes()`` → float lanes per vector of the energy kernels' register tiles as compiled
  (16 when built for AVX-512, else 8: a tile sized for AVX-512's 32 registers spills on AVX2's 16)
- ``parallel_threads(items)`` → how many threads one ``at::parallel_for`` of ``items`` items runs
  on in this library now (torch's intra-op thread count; 1 for a library compiled without OpenMP)

With A = softmax(scale·q kᵀ), A_ref = exp(scale·q_ref k_refᵀ − lse_ref) per (batch, head):
``row_sq_i = Σ_j (A − A_ref)²_ij``, ``row_dot_i = Σ_j A_ij (A − A_ref)_ij``,
``P = A ⊙ ((A − A_ref) − row_dot)``, ``dq_sum = P k``, ``dk_sum = Pᵀ q`` (so
∂Σ row_sq/∂q = 2·scale·dq_sum), all float32; without ``with_grad`` the sums are empty [0]
tensors. ``block_rows`` is the rows per BLAS tile of ``attention_lse`` (0: the kernel's default);
the energy kernels tile in registers (8 rows × 16 keys with AVX-512, 6 rows × 16 keys otherwise) and ignore it.

Dispatch (STYLE.md rule 4): :func:`native_unavailable_reason` names why the library cannot be
used (not built, built for another torch, built from older sources that lack an op); callers log
it once and take the torch path.
"""

from __future__ import annotations

import functools
import importlib.machinery
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

LIBRARY_ENV = "GNR_FAST_NATIVE_LIB"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_BUILD_HINT = "build it with `pip install -e .` (needs cmake and a C++17 compiler) or `cmake -S . -B build && cmake --build build`"
# Every op this module wraps; a library built from older sources may lack some.
REQUIRED_OPS = ("attn_map_energy_fwd", "attn_map_energy_bwd", "attention_lse", "vector_lanes", "parallel_threads")


def library_path() -> Path:
    """Where the native library is looked for: ``$GNR_FAST_NATIVE_LIB`` when set, else
    ``gnr_fast/_native<EXT_SUFFIX>`` beside the package (where ``pip install`` puts it)."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    return _PACKAGE_DIR / f"_native{importlib.machinery.EXTENSION_SUFFIXES[0]}"


def native_unavailable_reason() -> str | None:
    """Why the native library cannot be used in this process, or ``None`` when it is loaded.

    Checks, in order: the library file exists (:func:`library_path`), and the torch version it
    was built against (``<library>.torch-version``, written by CMake) equals ``torch.__version__``
    (C++ ops are tied to one torch ABI). Then loads it once and checks that it registers every op
    of :data:`REQUIRED_OPS` (a library left from older sources is refused, naming the missing op).
    """
    return _load(str(library_path()))


def native_available() -> bool:
    """True when the native ops are registered (see :func:`native_unavailable_reason`)."""
    return native_unavailable_reason() is None


@functools.cache
def _load(path_str: str) -> str | None:
    """Load the library at ``path_str`` once and register the fake kernels; the reason when not."""
    path = Path(path_str)
    if not path.is_file():
        where = f"${LIBRARY_ENV}={path}" if os.environ.get(LIBRARY_ENV) else str(path)
        return f"the native library was not built ({where} is missing); {_BUILD_HINT}"
    stamp = path.with_name(path.name + ".torch-version")
    built_for = stamp.read_text().strip() if stamp.is_file() else "an unknown torch (no .torch-version file)"
    if built_for != torch.__version__:
        return f"{path} was built for torch {built_for}, this is torch {torch.__version__}; rebuild it ({_BUILD_HINT})"
    torch.ops.load_library(str(path))
    missing = missing_ops(REQUIRED_OPS)
    if missing:
        return f"{path} was built from older sources (it lacks gnr_fast_native::{', '.join(missing)}); rebuild it ({_BUILD_HINT})"
    _register_fakes()
    logger.debug("loaded the native ops from %s", path)
    return None


def missing_ops(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that no loaded library registers as ``gnr_fast_native::<name>``."""
    return [name for name in names if not torch._C._dispatch_has_kernel(f"gnr_fast_native::{name}")]


def _register_fakes() -> None:
    """Shape-only twins of the C++ ops, so torch.compile / FakeTensor tracing sees their outputs."""

    @torch.library.register_fake("gnr_fast_native::attn_map_energy_fwd")
    def _fwd_fake(q, k, q_ref, k_ref, lse_ref, scale, with_grad, block_rows):
        batch, heads, tokens, _ = q.shape
        row_sq = q.new_empty(batch, heads, tokens)
        grads = (torch.empty_like(q), torch.empty_like(k)) if with_grad else (q.new_empty(0), q.new_empty(0))
        return row_sq, torch.empty_like(row_sq), *grads

    @torch.library.register_fake("gnr_fast_native::attn_map_energy_bwd")
    def _bwd_fake(q, k, q_ref, k_ref, lse_ref, row_dot, scale, block_rows):
        return torch.empty_like(q), torch.empty_like(k)

    @torch.library.register_fake("gnr_fast_native::attention_lse")
    def _lse_fake(q, k, scale, block_rows):
        return q.new_empty(q.shape[:3])


# --------------------------------------------------------------------------------------------
# Typed wrappers (callers check native_available() and pass float32 CPU tensors)
# --------------------------------------------------------------------------------------------


def attn_map_energy_fwd(
    q: Tensor, k: Tensor, q_ref: Tensor, k_ref: Tensor, lse_ref: Tensor, scale: float, with_grad: bool,
    block_rows: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(row_sq, row_dot, dq_sum, dk_sum)`` of float32 [B, H, N, D] inputs (module docstring)."""
    return torch.ops.gnr_fast_native.attn_map_energy_fwd(q, k, q_ref, k_ref, lse_ref, scale, with_grad, block_rows)


def attn_map_energy_bwd(
    q: Tensor, k: Tensor, q_ref: Tensor, k_ref: Tensor, lse_ref: Tensor, row_dot: Tensor, scale: float,
    block_rows: int = 0,
) -> tuple[Tensor, Tensor]:
    """``(dq_sum, dk_sum)`` recomputed from the forward's ``row_dot`` (module docstring)."""
    return torch.ops.gnr_fast_native.attn_map_energy_bwd(q, k, q_ref, k_ref, lse_ref, row_dot, scale, block_rows)


def attention_lse(q: Tensor, k: Tensor, scale: float, block_rows: int = 0) -> Tensor:
    """``logsumexp(scale · q kᵀ, -1)``, [B, H, N] float32, for q [B, H, N, D], k [B, H, L, D]."""
    return torch.ops.gnr_fast_native.attention_lse(q, k, scale, block_rows)


def vector_lanes() -> int:
    """Float lanes per vector of the energy kernels in the loaded library (16: AVX-512 build, 8: other)."""
    return int(torch.ops.gnr_fast_native.vector_lanes())


def parallel_threads(items: int = 64) -> int:
    """How many threads the loaded library's ``at::parallel_for`` loops run on now, counted over one
    loop of ``items`` items: ``min(items, torch.get_num_threads())`` for a library built with OpenMP,
    1 for one built without (whose loops ignore torch's thread count)."""
    return int(torch.ops.gnr_fast_native.parallel_threads(items))
