"""Parity with the authors' reference implementation on the golden run (shared/golden).

The golden run was produced single-threaded in float32; these tests use one torch thread so the
reductions round the same way. Tolerances: the issue's targets (1e-5 inversion, 1e-4 UNet terms,
1e-3 guider gradient and ε_final). The guider gradient contains ∂|Φ_cur − Φ_inv|/∂z, whose sign
flips for feature differences within rounding of zero; on such steps (pinned: 1 and 15) the float32
result of *any* implementation moves by more than 1e-3. There the bound is the FlashAttention rule on
the reference step's own float32 error against its float64 run (never the error under test), capped;
test_guider_gradient_mutation_is_rejected checks that a one-step bug cannot hide there.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gnr_fast import Editor
from gnr_fast.config import EditConfig, SelfAttnMapL2Appearance
from gnr_fast.fast.step import fast_step
from parity import (
    GoldenRun,
    free_running,
    rel_err,
    summarize,
    teacher_forced_edit,
    teacher_forced_inversion,
)
from gnr_fast.reference.step import reference_step


@pytest.fixture(scope="module")
def golden(golden_dir) -> GoldenRun:
    return GoldenRun.load(golden_dir / "nonstyle_scene0")


@pytest.fixture(scope="module")
def golden_editor(golden_dir, one_torch_thread) -> Editor:
    return Editor.from_pretrained(golden_dir / "tiny-sd")


@pytest.fixture(scope="module")
def golden_editor_fp64(golden_dir, one_torch_thread) -> Editor:
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


# Per guided step (relative L2 of the guider gradient), from the *reference* step only, so that no bug in the
# fast or compiled step can move them: "g64", our float64 reference vs golden (the golden run's own float32 error,
# taking our float64 result as the truth), and "floor", our float32 reference vs our float64 reference (our float32
# error). The code under test is then held to its stable bound on every guided step, except on the pinned steps
# below, where float32 is unstable: some |Φ_cur − Φ_inv| lies within rounding of zero and its sign flips move a
# float32 gradient by ~1e-3, and which side a run lands on depends on the CPU's kernels. There the bound is the
# FlashAttention rule on the reference's quantities — twice the two float32 errors together (ours and the
# golden run's, both against our float64 run: by the triangle inequality they can differ by their sum) —,
# and g64 and floor themselves are capped (test_float64_reference_matches_golden).
# Measured (torch 2.13.0 CPU, one thread), step 1: g64 2.16e-3 on every host (a float64 run is host-independent);
# floor 2.2e-3 (Zen 4 AVX-512, 2026-12-01), 9.4e-6 (Zen 3 AVX2, 2026-12-03), 2.16e-3 (Xeon AVX-512 + bf16,
# 2026-12-07). Step 15: g64 4.9e-6; floor 2.9e-3 (Zen 4), 2.82e-3 (Zen 3), 6.7e-6 (Xeon). Every other guided step
# (2-29) on the Xeon: g64 ≤ 8.4e-6, floor ≤ 7.4e-6, reference g32 ≤ 8.2e-6, fast g32 ≤ 1.1e-5, ε_final ≤ 8.7e-6.
# A bug confined to one guided step (test_guider_gradient_mutation_is_rejected: 3 % on the attention-map guider's
# scale at step 1, 15, 20 or 28 moves that step's gradient by 1.6-2.9e-2) exceeds every bound here.
UNSTABLE_STEPS = frozenset({1, 15})  # the steps measured float32-unstable on some host (above)
UNSTABLE_CAP = 5e-3  # g64 and floor on those steps: measured ≤ 2.9e-3
STABLE = {  # bounds on the other guided steps, ≈ 10x the worst measured
    "g64": 8e-5,  # measured ≤ 8.4e-6
    "floor": 7e-5,  # measured ≤ 7.4e-6 (6.9e-6 on Zen 4)
    "g32": 9e-5,  # measured ≤ 8.7e-6
    "eps_final": 9e-5,  # measured ≤ 8.8e-6
}
# The fast and compiled steps sum float32 in another order than the reference step, so on an unstable step they may
# land on the other side of a flip where the reference did not: measured 3.9e-3 compiled at step 15 (eager float32
# reference there 2.9e-3, Zen 4); allowed up to the cap on the pinned steps only.
REORDERED_FLIP = UNSTABLE_CAP


def _reference_noise(ref_row, r64) -> dict[str, float]:
    """g64 and floor of one guided step (both from the reference step: see above)."""
    return {"g64": r64.guider_grad, "floor": rel_err(ref_row.guider_grad_value, r64.guider_grad_value)}


def assert_guided_steps_within_float32_noise(rows, reference_rows, rows64, stable_grad: float, stable_final: float,
                                              unguided_final: float, reordered_flip: float = 0.0) -> None:
    """Each guided step's gradient and ε_final within ``stable_*`` of golden; on UNSTABLE_STEPS within
    twice the reference step's float32 error plus the golden run's (``reference_rows`` against
    ``rows64``) if that is larger, or within ``reordered_flip``; unguided steps' ε_final within
    ``unguided_final``. Nothing the rows under test hold widens a bound."""
    references = {r.step: r for r in reference_rows}
    for row in rows:
        if row.guider_grad_value is None:
            assert row.eps_final <= unguided_final, f"unguided step {row.step}: eps_final {row.eps_final:.2e}"
            continue
        grad_bound, final_bound = stable_grad, stable_final
        if row.step in UNSTABLE_STEPS:
            d = _reference_noise(references[row.step], rows64[row.step])
            wide = max(2 * (d["g64"] + d["floor"]), reordered_flip)
            grad_bound, final_bound = max(grad_bound, wide), max(final_bound, wide)
        assert row.guider_grad <= grad_bound, f"step {row.step}: {row.guider_grad:.2e} > {grad_bound:.2e}"
        assert row.eps_final <= final_bound, f"step {row.step}: eps_final {row.eps_final:.2e} > {final_bound:.2e}"


def test_float64_reference_matches_golden(reference_rows, reference_rows64):
    """The premise of the float32-noise bound: our float64 gradient is the value the golden float32 run
    approximates (g64 small) and our float32 reference is close to it (floor small), except on the
    pinned float32-unstable steps, where both are capped."""
    for row in reference_rows:
        if row.guider_grad_value is None:
            continue
        r64 = reference_rows64[row.step]
        assert r64.grad_presence_matches, row.step
        d = _reference_noise(row, r64)
        if row.step in UNSTABLE_STEPS:
            assert d["g64"] <= UNSTABLE_CAP and d["floor"] <= UNSTABLE_CAP, f"step {row.step}: {d}"
        else:
            assert d["g64"] <= STABLE["g64"] and d["floor"] <= STABLE["floor"], f"step {row.step}: {d}"


def test_reference_guider_gradient_within_float32_noise(reference_rows, reference_rows64):
    assert_guided_steps_within_float32_noise(reference_rows, reference_rows, reference_rows64, STABLE["g32"],
                                             STABLE["eps_final"], 1e-4)


@pytest.fixture(scope="module")
def fast_rows(golden_editor, golden):
    """The fast step teacher-forced on the golden run (shared with the mutation test)."""
    return teacher_forced_edit(golden_editor, golden, fast_step)


def test_fast_step_terms_teacher_forced(fast_rows, reference_rows, reference_rows64):
    """UNet terms within 1e-4; guider gradient and ε_final within 1e-3 of golden on each guided step
    (measured ≤ 1.2e-5), or within the float32-unstable bound on the pinned steps (the same math as the
    reference step, so its float64 run is the truth for both)."""
    summary = summarize(fast_rows)
    assert summary["grad_presence_mismatches"] == 0
    assert summary["eps_u"] <= 1e-4 and summary["delta_cfg"] <= 1e-4 and summary["gamma"] <= 1e-4
    assert_guided_steps_within_float32_noise(fast_rows, reference_rows, reference_rows64, 1e-3, 1e-3, 1e-3,
                                             REORDERED_FLIP)


@pytest.mark.parametrize("step", [1, 15, 20, 28])
def test_guider_gradient_mutation_is_rejected(golden_editor, golden, fast_rows, reference_rows, reference_rows64, step):
    """The golden check must catch a bug confined to one guided step: the attention-map guider's scale
    3 % too large at ``step`` only (the fast step re-run teacher-forced at that step, the other rows
    reused) must fail the bound that the unmutated rows pass. With the former bound, which took the
    float32-unstable set and its width from the error under test, every one of these passed."""
    config = EditConfig.preset(golden.preset, golden.num_steps)
    mutated = tuple(
        replace(g, self_attn_scale=tuple(v * 1.03 if i == step else v for i, v in enumerate(g.self_attn_scale)))
        if isinstance(g, SelfAttnMapL2Appearance) else g
        for g in config.guiders
    )
    assert mutated != config.guiders, "the nonstyle preset has no attention-map guider to mutate"
    (row,) = teacher_forced_edit(golden_editor, golden, fast_step, replace(config, guiders=mutated), steps=[step])
    assert rel_err(row.guider_grad_value, fast_rows[step].guider_grad_value) >= 1e-2  # measured 1.6-2.9e-2
    rows = [row if r.step == step else r for r in fast_rows]
    with pytest.raises(AssertionError, match=f"step {step}:"):
        assert_guided_steps_within_float32_noise(rows, reference_rows, reference_rows64, 1e-3, 1e-3, 1e-3,
                                                 REORDERED_FLIP)


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_free_running(golden_editor, golden, mode):
    result = free_running(golden_editor, golden, mode=mode)
    assert result.inversion_rel <= 5e-5
    assert result.final_latent_rel <= 5e-2
    assert result.image_psnr_db >= 30.0


# --- the compiled runtime holds the same tolerances (slow: cold inductor compiles take minutes) ---


@pytest.fixture(scope="module")
def golden_editor_compiled(golden_dir, one_torch_thread, tmp_path_factory) -> Editor:
    import os

    from gnr_fast.runtime import RuntimeConfig, inductor_unavailable_reason

    reason = inductor_unavailable_reason("cpu")
    if reason:
        pytest.skip(reason)
    cache = os.environ.get("GNR_TEST_INDUCTOR_CACHE") or tmp_path_factory.mktemp("inductor-cache")
    torch._dynamo.reset()
    return Editor.from_pretrained(golden_dir / "tiny-sd", runtime=RuntimeConfig.preset("compiled").with_cache_dir(cache))


@pytest.mark.slow
@pytest.mark.inductor
def test_compiled_fast_step_terms_teacher_forced(golden_editor_compiled, golden, reference_rows, reference_rows64):
    """The eager fast step's bounds; on the pinned float32-unstable steps the guider gradient and
    ε_final get the bound above (the reference's FlashAttention rule, or the reordered-flip cap) instead of 1e-3.
    Measured 2026-12-02 (torch 2.13.0 CPU, one thread), after the inductor upsample-backward fix
    (gnr_fast/runtime/decompositions.py; before it γ was 2.2e-2 and the gradient 2.4-7.1e-2 off on
    every guided step): ε_u 1.7e-6, Δcfg 2.8e-5, γ 1.9e-5; guider gradient ≤ 1.5e-5 on every guided
    step but 15, where inductor's reordered float32 flips the sign of near-zero feature differences:
    3.9e-3 from golden and from our float64 run (eager float32 there: 6.5e-6; the reference step's
    own float32 error there: 2.9e-3), ε_final 2.0e-3."""
    assert teacher_forced_inversion(golden_editor_compiled, golden) <= 1e-5
    rows = teacher_forced_edit(golden_editor_compiled, golden, fast_step)
    summary = summarize(rows)
    assert summary["grad_presence_mismatches"] == 0
    assert summary["eps_u"] <= 1e-4 and summary["delta_cfg"] <= 1e-4 and summary["gamma"] <= 1e-4
    assert_guided_steps_within_float32_noise(rows, reference_rows, reference_rows64, 1e-3, 1e-3, 1e-3, REORDERED_FLIP)


@pytest.mark.slow
@pytest.mark.inductor
def test_compiled_free_running(golden_editor_compiled, golden):
    result = free_running(golden_editor_compiled, golden, mode="fast")
    assert result.inversion_rel <= 5e-5
    assert result.final_latent_rel <= 5e-2
    assert result.image_psnr_db >= 30.0


# --- plain calls on ONNX Runtime (issue 14): the same free-running bounds ---


@pytest.fixture(scope="module")
def golden_editor_onnx(golden_dir, one_torch_thread, tmp_path_factory) -> Editor:
    from gnr_fast.runtime import RuntimeConfig

    runtime = RuntimeConfig("onnx", "eager", export_cache_dir=tmp_path_factory.mktemp("onnx-cache"))
    return Editor.from_pretrained(golden_dir / "tiny-sd", runtime=runtime)


def test_onnx_free_running(golden_editor_onnx, golden):
    """Inversion and ε_u / ε_trg on ONNX Runtime (exported lazily on the first call), capturing and
    grad calls eager. Measured 2026-12-02 (onnxruntime CPU provider, one thread): inversion 1.1e-5,
    final latent 6.0e-3 relative, image 55.2 dB; ~50 s with the export on an idle machine, so it
    stays in the default suite."""
    result = free_running(golden_editor_onnx, golden, mode="fast")
    assert result.inversion_rel <= 5e-5
    assert result.final_latent_rel <= 5e-2
    assert result.image_psnr_db >= 30.0
