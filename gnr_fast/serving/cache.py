"""The server's inversion cache: repeat edits of an image skip its inversion and its source pass.

An entry is one :class:`~gnr_fast.Inversion` — the DDIM trajectory plus the
:class:`~gnr_fast.fast.SourceCache` that fast edits fill with the source-pass internals
(DESIGN.md §8). Entries are keyed by everything an inversion depends on and evicted least
recently used first so that the bytes held (trajectory + source cache) stay under a budget. An
entry's source cache grows while it is edited, so the server calls :meth:`InversionCache.refresh`
after each edit to re-measure it. All methods are thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import ConfigError
from ..inversion import Inversion


@dataclass(frozen=True)
class InversionKey:
    """What an inversion depends on: the pixels, the prompt, the model, the steps, the preprocessing."""

    content_hash: str  # sha256 of the input's RGB pixels (with its size)
    source_prompt: str
    model_id: str
    num_steps: int
    working_size: tuple[int, int]  # (width, height) after the resize policy

    @classmethod
    def of(cls, inversion: Inversion) -> "InversionKey":
        return cls(
            inversion.content_hash,
            inversion.source_prompt,
            inversion.model_id,
            inversion.num_steps,
            tuple(inversion.working_size),
        )


def inversion_nbytes(inversion: Inversion) -> int:
    """Bytes an inversion holds: its trajectory plus its source cache's stored internals."""
    latents = inversion.latents
    size = latents.numel() * latents.element_size()
    if inversion.source_cache is not None:
        size += inversion.source_cache.nbytes
    return size


@dataclass(frozen=True)
class CacheStats:
    """A consistent snapshot of the cache's counters."""

    hits: int
    misses: int
    evictions: int
    entries: int
    nbytes: int
    max_bytes: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class InversionCache:
    """LRU cache of inversions bounded by ``max_bytes`` (0 disables caching)."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"inversion cache size must be a non-negative number of bytes, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[InversionKey, tuple[Inversion, int]] = OrderedDict()  # key -> (inversion, bytes)
        self._nbytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: InversionKey) -> Inversion | None:
        """The cached inversion for ``key`` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: InversionKey, inversion: Inversion) -> bool:
        """Store ``inversion`` under ``key``, evicting LRU entries as needed; False if it alone is too big."""
        with self._lock:
            self._discard(key)
            size = inversion_nbytes(inversion)
            if size > self.max_bytes:
                return False
            self._entries[key] = (inversion, size)
            self._nbytes += size
            self._evict_over_budget(keep=key)
            return True

    def refresh(self, key: InversionKey) -> None:
        """Re-measure ``key``'s entry (its source cache grew during an edit) and evict to stay in budget.

        An entry that alone exceeds the budget keeps its trajectory and drops its source cache.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            inversion, old = entry
            size = inversion_nbytes(inversion)
            if size > self.max_bytes:
                inversion.source_cache = None
                size = inversion_nbytes(inversion)
            self._entries[key] = (inversion, size)
            self._nbytes += size - old
            self._evict_over_budget(keep=key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._entries), self._nbytes, self.max_bytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def _discard(self, key: InversionKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._nbytes -= entry[1]

    def _evict_over_budget(self, keep: InversionKey) -> None:
        """Drop least recently used entries other than ``keep`` until the bytes fit."""
        while self._nbytes > self.max_bytes:
            victim = next((k for k in self._entries if k != keep), None)
            if victim is None:
                return
            self._discard(victim)
            self._evictions += 1
