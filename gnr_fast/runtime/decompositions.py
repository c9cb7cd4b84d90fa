"""The decomposition table compiled backends hand to inductor: inductor's own, plus overrides for
inductor bugs that give wrong numbers in our graphs (each override names the bug it avoids).

``index_put`` / ``_unsafe_index_put`` (the backward of nearest-neighbour upsampling, i.e. of every
``Upsample2D`` of an SD UNet: ``F.interpolate(..., mode="nearest")`` traces to ``_unsafe_index``,
whose gradient is ``_unsafe_index_put(zeros, indices, grad, accumulate=True)``). torch 2.13's
inductor lowers it to a zero-filled buffer plus a scatter-add that mutates that buffer, and its
scheduler can fuse a reader of the buffer into the zero-fill kernel, i.e. *before* the scatter:
the reader sees zeros and the whole gradient through that upsampler is lost, silently. On the
golden tiny-sd grad call this dropped the gradient through ``up_blocks[0].upsamplers[0]`` (the
generated backward zero-filled the 64×4×4 buffer and read it in the same kernel, then ran the
scatter into it and discarded the result): ∂E/∂z was 2.4–7 % off on every guided step and γ 2.2 %
(aot_eager, and AOTAutograd with inductor's decompositions but no inductor code generation, were
exact). ``tests/runtime/test_decompositions.py`` holds a 4×4 pattern that inductor alone gets
wrong (gradient exactly 0). Here both ops become :func:`index_put`, an opaque op that inductor runs
as an extern kernel (ATen's own index_put, a functional copy), so no scatter into a fresh buffer
is generated; only the upsamplers' backward (3–4 per grad call) changes.

AOTAutograd's on-disk cache keys a compiled graph by the traced graph and configs but *not* by
the decomposition table, so a cache written without an override would keep serving the wrong
graph; :func:`cache_key_tag` therefore names the override set, and compiles run under it.
"""

import torch
from torch import Tensor

aten = torch.ops.aten


@torch.library.custom_op("gnr_fast::index_put", mutates_args=())
def index_put(x: Tensor, indices: list[Tensor | None], values: Tensor, accumulate: bool) -> Tensor:
    """``aten.index_put(x, indices, values, accumulate)`` (a new tensor; ``x`` is not modified),
    opaque to inductor so that it is called as an extern kernel instead of lowered to a scatter."""
    return aten.index_put.default(x, indices, values, accumulate)


@index_put.register_fake
def _index_put_fake(x: Tensor, indices: list[Tensor | None], values: Tensor, accumulate: bool) -> Tensor:
    return torch.empty_like(x)  # ATen's index_put returns x.clone() (same layout), updated


def _index_put_decomposition(x: Tensor, indices: list[Tensor | None], values: Tensor, accumulate: bool = False) -> Tensor:
    return torch.ops.gnr_fast.index_put(x, list(indices), values, accumulate)


OVERRIDES = {
    aten.index_put.default: _index_put_decomposition,
    aten._unsafe_index_put.default: _index_put_decomposition,
}
"""Ops decomposed differently from inductor's table (see the module docstring)."""


OVERRIDES_VERSION = "gnr_fast.decompositions.1"
"""Bumped whenever :data:`OVERRIDES` change, so that no cached graph compiled with other ones is reused."""


def cache_key_tag() -> str:
    """``torch.compiler.config.cache_key_tag`` to compile under: the user's tag (if any) plus
    :data:`OVERRIDES_VERSION` (part of inductor's and AOTAutograd's cache keys)."""
    user = torch.compiler.config.cache_key_tag
    return OVERRIDES_VERSION if not user or user.endswith(OVERRIDES_VERSION) else f"{user}+{OVERRIDES_VERSION}"


class DecompositionTable(dict):
    """Inductor's table with our overrides, pickled as a reference to how it is built.

    Inductor's FX-graph cache pickles the table passed to ``compile_fx`` into its cache key, and
    more than half of inductor's own entries are wrapped functions pickle refuses, so a plain dict
    made every compile bypass the disk cache (a "warm" start recompiled every graph: 156 s instead
    of ≈ 34 s on the bundled model). Pickled as ``(inductor_decompositions, (OVERRIDES_VERSION,))``
    the key names this module's builder and the override version; the rest of what the table
    depends on (torch's version, inductor's config) is in inductor's key already."""

    def __reduce__(self):
        return inductor_decompositions, (OVERRIDES_VERSION,)


def inductor_decompositions(version: str = OVERRIDES_VERSION) -> DecompositionTable:
    """Inductor's decomposition table (``select_decomp_table()``, for the current inductor config)
    with :data:`OVERRIDES` applied: what :class:`~gnr_fast.runtime.compiled.CountingBackend`
    passes to ``compile_fx``. ``version`` is the override version the table is keyed by (only
    the current one can be built)."""
    from torch._inductor.decomposition import select_decomp_table

    if version != OVERRIDES_VERSION:
        raise ValueError(f"decomposition overrides {version!r} are not these ({OVERRIDES_VERSION!r})")
    return DecompositionTable({**select_decomp_table(), **OVERRIDES})
