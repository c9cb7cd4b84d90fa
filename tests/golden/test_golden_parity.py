"""Parity with the authors' reference implementation on the golden run (shared/golden).

The golden run was produced single-threaded in float32; these tests use one torch thread so the
reductions round the same way. Tolerances: the issue's targets (1e-5 inversion, 1e-4 UNet terms,
1e-3 guider gradient and ε_final). The guider gradient contains ∂|Φ_cur − Φ_inv|/∂z, whose sign
flips for feature differences within rounding of zero; on such steps the float32 result of *any*
implementation moves by more than 1e-3. There the bound is the FlashAttention rule: our error
against the golden gradient may be at most twice our own float32 error against a float64 run.
"""

from __future__ import annotations

import pytest
import torch

from gnr_fast import Editor
from gnr_fast.parity import GoldenRun, free_running, rel_err, summarize, teacher_forced_edit, teacher_forced_inversion
from gnr_fast.fast.step import fast_step
from gnr_fast.reference.step import reference_step


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden(golden_dir) -> GoldenRun:
    return GoldenRun.load(golden_dir / "nonstyle_scene0")


@pytest.fixture(scope="module")
def golden_editor(golden_dir, one_thread) -> Editor:
    return Editor.from_pretrained(golden_dir / "tiny-sd")


@pytest.fixture(scope="module")
def golden_editor_fp64(golden_dir, one_thread) -> Editor:
    return Editor.from_pretrained(golden_dir / "tiny-sd", dtype=torch.float64)


def test_inversion_teacher_forced(golden_editor, golden):
    assert teacher_forced_inversion(golden_editor, golden) <= 1e-5


@pytest.fixture(scope="module")
def reference_rows(golden_editor, golden):
    return teacher_forced_edit(golden_editor, golden, reference_step)


def test_reference_step_terms_teacher_forced(reference_rows):
    summary = summarize(reference_rows)
    assert summary["grad_presence_mismatches"] == 0
    assert summary["eps_u"] <= 1e-4
    assert summary["delta_cfg"] <= 1e-4
    assert summary["gamma"] <= 1e-4
    assert summary["guider_grad_median"] <= 1e-4


@pytest.fixture(scope="module")
def reference_rows64(golden_editor_fp64, golden):
    """Our reference step in float64, teacher-forced on the golden run, by step."""
    return {r.step: r for r in teacher_forced_edit(golden_editor_fp64, golden, reference_step)}


# Measured 2026-12-01 (torch 2.13.0 CPU, one thread), guided steps 1-29 of the golden run: our float64
# guider gradient vs the golden (float32) one is 1.9e-6-3.5e-6 on every step but step 1, where it is 2.2e-3:
# there z = z* + one step, |Φ_cur − Φ_inv| is near zero and its sign flips move any float32 gradient (ours
# float32 vs float64: 2.2e-3 too; ours float32 vs golden: 1.3e-5, the same rounding). Our float32-vs-float64
# distance ("floor") is 1.7e-6-2.5e-6 on the other steps.
UNSTABLE = 1e-4  # golden's own float32 gradient this far from float64: a step no float32 code can match to 1e-3
PREMISE_STABLE = 4e-5  # our float64 vs golden on the other steps, ≈ 10x the worst measured
FLOOR_STABLE = 3e-5  # our float32 vs our float64 on the other steps, ≈ 10x the worst measured
MAX_UNSTABLE_STEPS = 1  # measured: step 1 only
GRAD_STABLE = 4e-5  # our float32 guider gradient vs golden on stable steps: measured ≤ 3.9e-6
EPS_FINAL_STABLE = 6e-5  # our float32 ε_final vs golden on stable guided steps: measured ≤ 5.9e-6


def test_float64_reference_matches_golden(reference_rows, reference_rows64):
    """The premise of the float32-noise bound below: our float64 gradient is the value the golden float32 run
    approximates — within 10x of the measured agreement on stable steps, and on the unstable step no
    farther from golden than our own float32 result is from it (the golden's float32 noise ≈ ours)."""
    unstable = []
    for row in reference_rows:
        if row.guider_grad_value is None:
            continue
        r64 = reference_rows64[row.step]
        assert r64.grad_presence_matches, row.step
        floor = rel_err(row.guider_grad_value, r64.guider_grad_value)
        if r64.guider_grad > UNSTABLE:
            unstable.append(row.step)
            assert r64.guider_grad <= 2 * floor, f"step {row.step}: float64 vs golden {r64.guider_grad:.2e}, floor {floor:.2e}"
        else:
            assert r64.guider_grad <= PREMISE_STABLE, f"step {row.step}: float64 vs golden {r64.guider_grad:.2e}"
            assert floor <= FLOOR_STABLE, f"step {row.step}: our float32 vs float64 {floor:.2e}"
    assert len(unstable) <= MAX_UNSTABLE_STEPS, f"float32-unstable steps {unstable}"


def test_reference_guider_gradient_within_float32_noise(reference_rows, reference_rows64):
    for row in reference_rows:
        if row.guider_grad_value is None:
            continue
        r64 = reference_rows64[row.step]
        floor = rel_err(row.guider_grad_value, r64.guider_grad_value)
        # the FlashAttention rule only where the golden itself is float32-unstable (premise test above)
        if r64.guider_grad > UNSTABLE:
            grad_bound = final_bound = max(1e-3, 2 * floor)
        else:
            grad_bound, final_bound = GRAD_STABLE, EPS_FINAL_STABLE
        assert row.guider_grad <= grad_bound, f"step {row.step}: {row.guider_grad:.2e} > {grad_bound:.2e}"
        assert row.eps_final <= final_bound, f"step {row.step}: eps_final {row.eps_final:.2e} > {final_bound:.2e}"
    for row in reference_rows:
        if row.guider_grad_value is None:
            assert row.eps_final <= 1e-4, f"unguided step {row.step}: eps_final {row.eps_final:.2e}"


def test_fast_step_terms_teacher_forced(golden_editor, golden):
    rows = teacher_forced_edit(golden_editor, golden, fast_step)
    summary = summarize(rows)
    assert summary["grad_presence_mismatches"] == 0
    assert summary["eps_u"] <= 1e-4 and summary["delta_cfg"] <= 1e-4 and summary["gamma"] <= 1e-4
    assert summary["guider_grad"] <= 1e-3
    assert summary["eps_final"] <= 1e-3


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_free_running(golden_editor, golden, mode):
    result = free_running(golden_editor, golden, mode=mode)
    assert result.inversion_rel <= 5e-5
    assert result.final_latent_rel <= 5e-2
    assert result.image_psnr_db >= 30.0


# --- the compiled runtime holds the same tolerances (slow: cold inductor compiles take minutes) ---


@pytest.fixture(scope="module")
def golden_editor_compiled(golden_dir, one_thread, tmp_path_factory) -> Editor:
    import os

    from gnr_fast.runtime import RuntimeConfig, inductor_unavailable_reason

    reason = inductor_unavailable_reason("cpu")
    if reason:
        pytest.skip(reason)
    cache = os.environ.get("GNR_TEST_INDUCTOR_CACHE") or tmp_path_factory.mktemp("inductor-cache")
    torch._dynamo.reset()
    return Editor.from_pretrained(golden_dir / "tiny-sd", runtime=RuntimeConfig.preset("compiled").with_cache_dir(cache))


@pytest.mark.slow
def test_compiled_fast_step_terms_teacher_forced(golden_editor_compiled, golden):
    assert teacher_forced_inversion(golden_editor_compiled, golden) <= 1e-5
    rows = teacher_forced_edit(golden_editor_compiled, golden, fast_step)
    summary = summarize(rows)
    assert summary["grad_presence_mismatches"] == 0
    assert summary["eps_u"] <= 1e-4 and summary["delta_cfg"] <= 1e-4 and summary["gamma"] <= 1e-4
    assert summary["guider_grad"] <= 1e-3
    assert summary["eps_final"] <= 1e-3


@pytest.mark.slow
def test_compiled_free_running(golden_editor_compiled, golden):
    result = free_running(golden_editor_compiled, golden, mode="fast")
    assert result.inversion_rel <= 5e-5
    assert result.final_latent_rel <= 5e-2
    assert result.image_psnr_db >= 30.0
