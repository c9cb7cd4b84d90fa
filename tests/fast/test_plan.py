"""The per-step pass plans (DESIGN.md §3, §8): what each step of each preset runs."""

import dataclasses

import pytest

from gnr_fast.config import (
    CfgGuider,
    EditConfig,
    LatentsDiff,
    RescaleConfig,
    Role,
    SelfAttnMapL2,
)
from gnr_fast.fast.plan import Latent, Prompt, plan_edit, plan_step
from gnr_fast.runtime import CallKind


def test_nonstyle_guided_step_batches_no_grad_passes():
    plan = plan_step(EditConfig.nonstyle(), 5)
    assert plan.describe() == "step 5: capturing[z|uncond(eps_u), z|trg(eps_trg), z*|src(inv_inv)] + grad[z|src(cur_inv)] + backward"
    assert plan.rows == 4 and len(plan.calls) == 2
    assert [c.kind for c in plan.calls] == [CallKind.CAPTURING, CallKind.GRAD]


def test_split_source_gives_the_source_row_its_own_capturing_call():
    plan = plan_step(EditConfig.nonstyle(), 5, split_source=True)
    assert plan.describe() == (
        "step 5: plain[z|uncond(eps_u), z|trg(eps_trg)] + capturing[z*|src(inv_inv)] + grad[z|src(cur_inv)] + backward"
    )
    assert plan.rows == 4 and len(plan.calls) == 3
    # a cached source needs no capturing call at all
    assert [c.kind for c in plan_step(EditConfig.nonstyle(), 5, source_cached=True, split_source=True).calls] == [
        CallKind.PLAIN, CallKind.GRAD]


def test_nonstyle_step_35_runs_two_rows_and_no_backward():
    plan = plan_step(EditConfig.nonstyle(), 35)
    assert plan.describe() == "step 35: plain[z|uncond(eps_u), z|trg(eps_trg)]"
    assert plan.rows == 2 and not plan.backward


def test_window_boundary_follows_preset():
    cfg = EditConfig.nonstyle()
    assert plan_step(cfg, 29).backward and not plan_step(cfg, 30).backward


def test_cached_source_drops_the_source_row():
    plan = plan_step(EditConfig.nonstyle(), 5, source_cached=True)
    assert all(row.latent is Latent.CUR for call in plan.calls for row in call.rows)
    assert plan.rows == 3 and plan.backward


def test_identical_latents_skip_energies():
    plan = plan_step(EditConfig.nonstyle(), 0, energies_vanish=True)
    assert plan.rows == 2 and not plan.backward


def test_identical_latents_keep_target_prompt_energies():
    plan = plan_step(EditConfig.style(), 0, energies_vanish=True)
    assert [g.name for g in plan.energies] == ["features_map_l2"]
    assert plan.describe() == "step 0: capturing[z|uncond(eps_u), z*|src(inv_inv)] + grad[z|trg(cur_trg)] + backward"


def test_style_preset_differentiates_the_target_pass():
    plan = plan_step(EditConfig.style(), 3)
    grad_call = next(c for c in plan.calls if c.grad)
    assert {row.role for row in grad_call.rows} == {Role.CUR_INV, Role.CUR_TRG}
    no_grad = next(c for c in plan.calls if not c.grad)
    # ε_trg comes from the grad call, so the no-grad call holds only ε_u and the source pass
    assert [(r.latent, r.prompt) for r in no_grad.rows] == [(Latent.CUR, Prompt.UNCOND), (Latent.SRC, Prompt.SRC)]
    assert plan_step(EditConfig.style(), 25).rows == 2


def test_source_guidance_and_zero_cfg_scale():
    cfg = EditConfig(guiders=(CfgGuider(scale=(0.0, 5.0), is_source_guidance=True),), num_steps=2)
    assert plan_step(cfg, 0).rows == 1
    assert plan_step(cfg, 1).describe() == "step 1: plain[z|uncond(eps_u), z|src(eps_src)]"


def test_latents_diff_needs_no_pass():
    cfg = EditConfig(guiders=(CfgGuider(), LatentsDiff()), rescale=RescaleConfig("identity_rescaler"), num_steps=4)
    assert plan_step(cfg, 1).rows == 2 and not plan_step(cfg, 1).backward


def test_plain_attention_guider_reads_current_and_source():
    cfg = EditConfig(guiders=(CfgGuider(), SelfAttnMapL2(scale=1.0)), num_steps=4)
    plan = plan_step(cfg, 2)
    assert plan.rows == 4 and plan.energies == (cfg.guiders[1],)


def _rows(plans) -> tuple[int, int]:
    """(UNet rows, rows the backward runs through) of a sequence of step plans."""
    return (sum(p.rows for p in plans), sum(len(c.rows) for p in plans for c in p.calls if c.grad))


def test_nonstyle_edit_row_counts():
    first, repeat = plan_edit(EditConfig.nonstyle()), plan_edit(EditConfig.nonstyle(), source_cached=True)
    # 50 steps × (ε_u, ε_trg); guided steps 1–29 add the grad row and, uncached, the source row.
    assert _rows(first) == (100 + 29 + 29, 29)
    assert _rows(repeat) == (100 + 29, 29)


def test_exact_pairing_keeps_step_zero_energies():
    config = dataclasses.replace(EditConfig.nonstyle(), align_inversion="exact")
    assert plan_edit(config)[0].backward and not plan_edit(EditConfig.nonstyle())[0].backward


@pytest.mark.parametrize("preset", ["nonstyle", "style"])
def test_plan_edit_counts_the_rows_an_edit_runs(tiny_editor, sample_image, preset):
    steps = 6
    config = EditConfig.preset(preset, steps)
    inversion = tiny_editor.invert(sample_image, "a red circle", num_steps=steps, progress=False)
    runner = tiny_editor.runner
    for source_cached in (False, True):  # the first edit fills the source cache, the second reads it
        before, before_calls = runner.rows, runner.calls
        result = tiny_editor.edit(inversion, f"a green square {source_cached}", config=config, progress=False)
        plans = plan_edit(config, source_cached)
        assert runner.rows - before == result.unet_rows == _rows(plans)[0]
        assert runner.calls - before_calls == result.unet_calls == sum(len(p.calls) for p in plans)
