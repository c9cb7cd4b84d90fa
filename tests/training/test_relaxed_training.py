"""Relaxed-caption fine-tuning pieces: per-step captions from the pool, the deadline past midnight."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pytest
import torch

from gnr_fast.training.schedule import parse_deadline
from gnr_fast.training.unet import batch_captions
from gnr_fast.world import generate_scene, parse_caption
from gnr_fast.world.captions import parse_prompt


def _pool(n: int) -> dict:
    scenes = [generate_scene(s) for s in range(n)]
    return {"captions": [s.caption for s in scenes], "specs": [s.spec for s in scenes]}


def test_batch_captions_mixes_full_and_relaxed_captions_of_the_same_scenes():
    pool = _pool(40)
    idx = torch.arange(40).repeat(5)  # 200 captions
    captions = batch_captions(pool, idx, 0.5, np.random.default_rng(0))
    full = [c == pool["captions"][i] for c, i in zip(captions, idx.tolist())]
    assert 0.35 < np.mean(full) < 0.75  # 50 % relaxed; a relaxed draw can equal the grammar's caption
    for caption, i in zip(captions, idx.tolist()):
        parsed, truth = parse_prompt(caption), parse_caption(pool["captions"][i])
        assert parsed is not None, caption
        assert parsed.background_colours == truth.background_colours
        assert [(o.colour, o.shape) for o in parsed.objects] == [(o.colour, o.shape) for o in truth.objects]
    assert batch_captions(pool, idx[:8], 0.0, np.random.default_rng(0)) == [pool["captions"][i] for i in range(8)]


def test_batch_captions_needs_specs_for_relaxed_captions():
    with pytest.raises(ValueError, match="latent_pool.pt"):
        batch_captions({"captions": ["a large red circle on a blue background"]}, torch.tensor([0]), 0.5,
                       np.random.default_rng(0))


def test_deadline_after_midnight_is_tomorrow_and_a_recent_one_is_past():
    now = dt.datetime.now(dt.timezone.utc)
    late = (now - dt.timedelta(hours=13)).strftime("%H:%M")  # e.g. started 23:00 with --deadline 10:00
    recent = (now - dt.timedelta(minutes=30)).strftime("%H:%M")
    assert 10.5 * 3600 < parse_deadline(late) - time.time() < 11.1 * 3600
    assert -31 * 60 < parse_deadline(recent) - time.time() < -29 * 60 or now.hour == 0  # (wraps at 00:xx)
    assert parse_deadline(None) is None
