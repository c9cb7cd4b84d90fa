"""Relaxed-caption fine-tuning pieces: per-step captions from the pool, the deadline past midnight."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pytest
import torch

from gnr_shapes.training.schedule import parse_deadline
from gnr_shapes.training.unet import batch_captions
from gnr_shapes.world import generate_scene, parse_caption
from gnr_shapes.world.captions import parse_prompt


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


@pytest.mark.parametrize("unet_frozen", [False, True])
def test_distillation_is_zero_for_the_teacher_itself_and_trains_only_the_student(unet_frozen):
    from gnr_shapes.training.unet import SMOKE_SHAPE, build_text_encoder, build_unet, distillation_mse, frozen_teacher

    torch.manual_seed(0)
    unet, text = build_unet(SMOKE_SHAPE, 4), build_text_encoder(SMOKE_SHAPE)
    if unet_frozen:  # --freeze-unet: the student's own frozen UNet is the teacher's, no copy
        unet.requires_grad_(False).eval()
    teacher = frozen_teacher(unet, text, unet_frozen=unet_frozen)
    assert (teacher["unet"] is unet) == unet_frozen and teacher["text_encoder"] is not text
    zt, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    full, relaxed = torch.randint(0, 1000, (2, 77)), torch.randint(0, 1000, (2, 77))
    same = distillation_mse(unet(zt, t, encoder_hidden_states=text(full).last_hidden_state).sample, teacher, zt, t, full)
    assert float(same.detach()) == 0.0
    other = distillation_mse(unet(zt, t, encoder_hidden_states=text(relaxed).last_hidden_state).sample,
                             teacher, zt, t, full)
    other.backward()
    assert float(other) > 0
    assert all(p.grad is None for m in teacher.values() for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in text.parameters())


def test_embedding_anchor_is_zero_for_the_teacher_and_pulls_a_moved_student_back():
    from gnr_shapes.training.unet import SMOKE_SHAPE, build_text_encoder, build_unet, embedding_anchor_mse, frozen_teacher

    torch.manual_seed(0)
    text = build_text_encoder(SMOKE_SHAPE)
    teacher = frozen_teacher(build_unet(SMOKE_SHAPE, 4).eval(), text, unet_frozen=True)
    full = torch.randint(0, 1000, (2, 77))
    assert float(embedding_anchor_mse(text, teacher, full).detach()) == 0.0
    with torch.no_grad():
        text.final_layer_norm.bias.add_(0.1)  # move the student's output by 0.1 everywhere
    moved = embedding_anchor_mse(text, teacher, full)
    torch.testing.assert_close(moved.detach(), torch.tensor(0.01), rtol=1e-4, atol=0)
    moved.backward()
    assert float(text.final_layer_norm.bias.grad.sum()) > 0  # the gradient pulls the bias back down
    assert all(p.grad is None for p in teacher["text_encoder"].parameters())


def test_a_latent_pool_with_scene_specs_loads_without_pickle_code(tmp_path):
    """--resume reads latent_pool.pt with weights_only=True; the relaxed captions' scene specs are allowed."""
    import numpy as np

    from gnr_shapes.training.checkpoints import load_torch_file
    from gnr_shapes.world.scenes import sample_spec

    specs = [sample_spec(np.random.default_rng(seed)) for seed in range(3)]
    torch.save({"mean": torch.zeros(3, 4, 2, 2), "captions": ["a", "b", "c"], "specs": specs}, tmp_path / "pool.pt")
    assert load_torch_file(tmp_path / "pool.pt")["specs"] == specs


def test_a_latent_pool_written_before_the_package_move_loads(tmp_path, monkeypatch):
    """Pools pickled while the world lived in ``gnr_fast.world`` name ``gnr_fast.world.scenes.SceneSpec``
    (the runs/ pools of issue 35); load_torch_file still reads them, without pickle code."""
    import sys
    import types

    import numpy as np

    from gnr_shapes.training.checkpoints import load_torch_file
    from gnr_shapes.world import scenes
    from gnr_shapes.world.scenes import BackgroundSpec, ObjectSpec, SceneSpec, sample_spec

    specs = [sample_spec(np.random.default_rng(seed)) for seed in range(2)]
    old = types.ModuleType("gnr_fast.world.scenes")
    for cls in (SceneSpec, BackgroundSpec, ObjectSpec):
        setattr(old, cls.__name__, cls)
        monkeypatch.setattr(cls, "__module__", "gnr_fast.world.scenes")
    monkeypatch.setitem(sys.modules, "gnr_fast.world", types.ModuleType("gnr_fast.world"))
    monkeypatch.setitem(sys.modules, "gnr_fast.world.scenes", old)
    torch.save({"captions": ["a", "b"], "specs": specs}, tmp_path / "pool.pt")
    monkeypatch.undo()
    assert b"gnr_fast.world.scenes" in (tmp_path / "pool.pt").read_bytes()  # the old name is in the file
    assert "gnr_fast.world.scenes" not in sys.modules and scenes.SceneSpec.__module__ != "gnr_fast.world.scenes"
    assert load_torch_file(tmp_path / "pool.pt")["specs"] == specs
