"""Cache of the source pass (``inv_inv``) internals, carried by an :class:`~gnr_fast.Inversion`.

The source pass depends only on (image, source prompt, model, step, pairing, recorded layers
and sites), so a second edit of the same inversion can skip it (DESIGN.md §8). Memory-bounded:
steps that do not fit in ``max_bytes`` are simply not cached (their pass runs again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention.capture import CaptureMode, PassCapture
from ..config import FeatureSite


@dataclass(frozen=True)
class CacheKey:
    """What the cached internals depend on besides the inversion itself."""

    align_inversion: str
    layers: frozenset[int]
    feature_sites: frozenset[FeatureSite]
    num_steps: int


@dataclass
class SourceCache:
    """Per-step detached Q*, K*, lse* and features of the source pass, stored in ``storage_dtype``."""

    key: CacheKey
    max_bytes: int = 2 * 1024**3
    storage_dtype: torch.dtype = torch.float32
    steps: dict[int, PassCapture] = field(default_factory=dict)
    nbytes: int = 0
    hits: int = 0
    misses: int = 0

    def get(self, step: int, compute_dtype: torch.dtype) -> PassCapture | None:
        """The cached capture of ``step`` in ``compute_dtype`` (lse stays float32), or None."""
        stored = self.steps.get(step)
        if stored is None:
            self.misses += 1
            return None
        self.hits += 1
        if self.storage_dtype == compute_dtype:
            return stored
        out = PassCapture(layers=stored.layers, mode=CaptureMode.QK, feature_sites=stored.feature_sites, with_lse=True)
        out.queries = {i: t.to(compute_dtype) for i, t in stored.queries.items()}
        out.keys = {i: t.to(compute_dtype) for i, t in stored.keys.items()}
        out.lse = dict(stored.lse)
        out.scales = dict(stored.scales)
        out.features = {s: t.to(compute_dtype) for s, t in stored.features.items()}
        return out

    def put(self, step: int, capture: PassCapture) -> bool:
        """Store a detached copy of ``capture`` if it fits in the budget; return whether it was stored."""
        dtype = self.storage_dtype
        stored = PassCapture(layers=capture.layers, mode=CaptureMode.QK, feature_sites=capture.feature_sites, with_lse=True)
        # copy=True: captured rows are views into the whole batched call's tensors.
        stored.queries = {i: t.detach().to(dtype, copy=True) for i, t in capture.queries.items()}
        stored.keys = {i: t.detach().to(dtype, copy=True) for i, t in capture.keys.items()}
        stored.lse = {i: t.detach().clone() for i, t in capture.lse.items()}
        stored.scales = dict(capture.scales)
        stored.features = {s: t.detach().to(dtype, copy=True) for s, t in capture.features.items()}
        size = sum(
            t.numel() * t.element_size()
            for group in (stored.queries, stored.keys, stored.lse, stored.features)
            for t in group.values()
        )
        if self.nbytes + size > self.max_bytes:
            return False
        self.steps[step] = stored
        self.nbytes += size
        return True
