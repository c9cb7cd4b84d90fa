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
    """Per-step detached Q*, K*, lse* and features of the source pass, stored in ``storage_dtype``.

    ``host_storage``: keep the tensors in host memory (pinned for CUDA captures, copied back to the
    capture's device on :meth:`get`); ``None`` does so for CUDA captures, so that the cache of
    every inversion a server keeps does not hold device memory (docs/precision.md §6).
    """

    key: CacheKey
    max_bytes: int = 2 * 1024**3
    storage_dtype: torch.dtype = torch.float32
    host_storage: bool | None = None
    steps: dict[int, PassCapture] = field(default_factory=dict)
    noises: dict[int, torch.Tensor] = field(default_factory=dict)  # the source pass's ε, when a sampler reads it
    nbytes: int = 0
    hits: int = 0
    misses: int = 0
    device: torch.device | None = None  # where the captures came from (and :meth:`get` returns them)

    def get(self, step: int, compute_dtype: torch.dtype) -> PassCapture | None:
        """The cached capture of ``step`` in ``compute_dtype`` (lse stays float32), or None."""
        stored = self.steps.get(step)
        if stored is None:
            self.misses += 1
            return None
        self.hits += 1
        if self.storage_dtype == compute_dtype and not self.stores_on_host:
            return stored
        out = PassCapture(layers=stored.layers, mode=CaptureMode.QK, feature_sites=stored.feature_sites, with_lse=True)
        out.queries = {i: self._fetch(t, compute_dtype) for i, t in stored.queries.items()}
        out.keys = {i: self._fetch(t, compute_dtype) for i, t in stored.keys.items()}
        out.lse = {i: self._fetch(t, t.dtype) for i, t in stored.lse.items()}
        out.scales = dict(stored.scales)
        out.features = {s: self._fetch(t, compute_dtype) for s, t in stored.features.items()}
        return out

    def noise(self, step: int) -> torch.Tensor | None:
        """The source pass's ε of ``step`` ([1, 4, h, w] float32 on the captures' device) when it was
        stored with the capture (a consistency model's ε_inv), else None."""
        stored = self.noises.get(step)
        return None if stored is None else self._fetch(stored, torch.float32)

    def put(self, step: int, capture: PassCapture, eps: torch.Tensor | None = None) -> bool:
        """Store a detached copy of ``capture`` (and the pass's ``eps``, kept in float32) if it fits in
        the budget; return whether it was stored."""
        dtype = self.storage_dtype
        tensors = [*capture.queries.values(), *capture.lse.values(), *capture.features.values()]
        if self.device is None and tensors:
            self.device = tensors[0].device
        stored = PassCapture(layers=capture.layers, mode=CaptureMode.QK, feature_sites=capture.feature_sites, with_lse=True)
        # Copies: captured rows are views into the whole batched call's tensors.
        stored.queries = {i: self._store(t, dtype) for i, t in capture.queries.items()}
        stored.keys = {i: self._store(t, dtype) for i, t in capture.keys.items()}
        stored.lse = {i: self._store(t, t.dtype) for i, t in capture.lse.items()}
        stored.scales = dict(capture.scales)
        stored.features = {s: self._store(t, dtype) for s, t in capture.features.items()}
        noise = self._store(eps, torch.float32) if eps is not None else None
        size = sum(
            t.numel() * t.element_size()
            for group in (stored.queries, stored.keys, stored.lse, stored.features)
            for t in group.values()
        ) + (noise.numel() * noise.element_size() if noise is not None else 0)
        if self.nbytes + size > self.max_bytes:
            return False
        self.steps[step] = stored
        if noise is not None:
            self.noises[step] = noise
        self.nbytes += size
        return True

    @property
    def stores_on_host(self) -> bool:
        """Whether the cache keeps its tensors in host memory though they come from another device."""
        if self.device is None or self.device.type == "cpu":
            return False
        return self.host_storage is not False and (self.host_storage or self.device.type == "cuda")

    def _store(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A detached copy of ``tensor`` in ``dtype`` where the cache keeps it (pinned host memory or the device)."""
        tensor = tensor.detach()
        if not self.stores_on_host:
            return tensor.to(dtype, copy=True)
        host = torch.empty(tensor.shape, dtype=dtype, pin_memory=tensor.is_cuda)
        return host.copy_(tensor, non_blocking=tensor.is_cuda)  # ordered on the stream before any fetch

    def _fetch(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` on the captures' device in ``dtype`` (an asynchronous copy from pinned memory)."""
        return tensor.to(self.device, dtype, non_blocking=True)
