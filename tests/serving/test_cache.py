"""The inversion cache: keys, byte accounting (trajectory + source cache), LRU eviction, threads."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from gnr_fast import ConfigError, Inversion
from gnr_fast.images import prepare_image
from gnr_fast.serving import InversionCache, InversionKey, inversion_nbytes

MB = 1024**2


def _inversion(tag: str, floats: int = 1000) -> Inversion:
    """A synthetic inversion whose trajectory holds ``floats`` float32 values (4 bytes each)."""
    return Inversion(
        latents=torch.zeros(floats),
        source_prompt=f"prompt {tag}",
        num_steps=4,
        model_id="m",
        original_size=(64, 64),
        working_size=(64, 64),
        content_hash=tag,
    )


def test_key_of_an_inversion_matches_the_prepared_image(tiny_editor, sample_image):
    inversion = tiny_editor.invert(sample_image, "a red disc", num_steps=3, progress=False)
    prepared = prepare_image(sample_image)
    key = InversionKey(prepared.content_hash, "a red disc", tiny_editor.model_id, 3, prepared.working_size)
    assert InversionKey.of(inversion) == key
    assert InversionKey.of(inversion) != dataclasses.replace(key, num_steps=4)
    assert InversionKey.of(inversion) != dataclasses.replace(key, source_prompt="a red circle")


def test_hits_misses_and_lru_eviction_by_bytes():
    cache = InversionCache(max_bytes=10_000)
    a, b, c = (_inversion(t) for t in "abc")  # 4000 bytes each
    ka, kb, kc = (InversionKey.of(i) for i in (a, b, c))
    assert cache.get(ka) is None
    assert cache.put(ka, a) and cache.put(kb, b)
    assert cache.get(ka) is a  # a is now the most recently used
    assert cache.put(kc, c)  # 12000 > 10000: evicts b, the least recently used
    assert kb not in cache and ka in cache and kc in cache
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.nbytes) == (1, 1, 1, 2, 8000)
    assert stats.hit_rate == pytest.approx(0.5)


def test_entry_larger_than_the_budget_is_not_kept():
    cache = InversionCache(max_bytes=1000)
    big = _inversion("big")
    assert not cache.put(InversionKey.of(big), big)
    assert len(cache) == 0 and cache.stats().nbytes == 0
    with pytest.raises(ConfigError):
        InversionCache(max_bytes=-1)


def test_refresh_counts_the_source_cache_an_edit_filled(tiny_editor, sample_image):
    inversion = tiny_editor.invert(sample_image, "a red disc", num_steps=4, progress=False)
    key = InversionKey.of(inversion)
    trajectory = inversion.latents.numel() * inversion.latents.element_size()
    cache = InversionCache(max_bytes=64 * MB)
    cache.put(key, inversion)
    assert cache.stats().nbytes == trajectory
    tiny_editor.edit(inversion, "a green square", progress=False)  # fills inversion.source_cache
    assert inversion.source_cache.nbytes > 0
    cache.refresh(key)
    assert cache.stats().nbytes == trajectory + inversion.source_cache.nbytes == inversion_nbytes(inversion)


@pytest.mark.parametrize("room", ["for_the_edited_entry", "for_its_trajectory_only"])
def test_refresh_stays_within_the_budget(tiny_editor, sample_image, room):
    measured = tiny_editor.invert(sample_image, "a red disc", num_steps=4, progress=False)
    tiny_editor.edit(measured, "a green square", progress=False)
    full = inversion_nbytes(measured)  # trajectory + the source cache one edit fills
    trajectory = measured.latents.numel() * measured.latents.element_size()
    inversion = dataclasses.replace(measured, source_cache=None)
    key = InversionKey.of(inversion)
    other = _inversion("other", floats=100)  # 400 bytes
    cache = InversionCache(max_bytes=full if room == "for_the_edited_entry" else full - 1)
    cache.put(InversionKey.of(other), other)
    cache.put(key, inversion)
    tiny_editor.edit(inversion, "a green square", progress=False)
    cache.refresh(key)
    if room == "for_the_edited_entry":
        assert InversionKey.of(other) not in cache  # the least recently used entry made room
        assert inversion.source_cache is not None and cache.stats().nbytes == full
    else:
        assert inversion.source_cache is None  # too big alone: keeps its trajectory, drops the source cache
        assert InversionKey.of(other) in cache and cache.stats().nbytes == trajectory + 400
    assert key in cache and cache.stats().nbytes <= cache.max_bytes


def test_concurrent_use_keeps_the_accounting_consistent():
    cache = InversionCache(max_bytes=20 * 4000)  # room for 20 of the 40 inversions
    inversions = [_inversion(str(i)) for i in range(40)]
    rng = np.random.default_rng(0)
    plans = [rng.integers(0, 40, 300) for _ in range(8)]
    failures: list[BaseException] = []

    def worker(plan):
        try:
            for i in plan:
                key = InversionKey.of(inversions[i])
                if cache.get(key) is None:
                    cache.put(key, inversions[i])
                else:
                    cache.refresh(key)
        except BaseException as exc:  # surfaced by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures and not any(t.is_alive() for t in threads)
    stats = cache.stats()
    assert stats.hits + stats.misses == 8 * 300
    assert stats.nbytes == 4000 * stats.entries <= cache.max_bytes
    assert stats.entries == 20  # full, never over
