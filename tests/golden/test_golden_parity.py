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
from gnr_fast.fast.step import fast_step
from gnr_fast.parity import (
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


# Three distances per guided step (relative L2 of the guider gradient): ours float32 vs golden ("g32"), ours
# float64 vs golden ("g64": the golden run's own float32 error, taking our float64 result as the truth) and ours
# float32 vs ours float64 ("floor": our float32 error). Measured 2026-12-01 (torch 2.13.0 CPU, one thread, a Zen 4
# AVX-512 host), guided steps 1-29: on most steps all three are 1e-6-1e-5. On a few steps some |Φ_cur − Φ_inv| lies
# within rounding of zero and its sign flips move a float32 gradient by ~1e-3: at step 1 the golden's (g64 2.2e-3;
# ours agreed with golden, g32 1.3e-5, floor 2.2e-3), at step 15 ours (floor 2.9e-3, g32 2.9e-3; g64 4.9e-6).
# Which side of a flip a float32 run lands on depends on the CPU's kernels: on a Zen 3 AVX2 host (2026-12-03) the
# reference step's float32 gradient at step 1 agrees with our float64 run instead (g32 2.16e-3, g64 2.16e-3, floor
# 9.4e-6: the golden run is the one that is off), at step 15 g32 2.82e-3, floor 2.82e-3, g64 4.9e-6; the fast
# step: step 1 g32 1.8e-5, step 15 g32 2.82e-3 (floor against the float64 reference 2.82e-3).
# Only on such float32-unstable steps does the bound widen, to twice the two float32 errors together (ours and
# the golden run's, both against our float64 run: by the triangle inequality ours and golden's can differ by
# their sum); how many such steps there are and how far they move is capped, so a bug that destabilised our
# float32 gradient could not widen its own bound unnoticed.
UNSTABLE = 1e-4  # max(g64, floor) above this: a float32-unstable step
MAX_UNSTABLE_STEPS = 3  # measured: 2 (steps 1 and 15)
UNSTABLE_CAP = 3e-2  # g64 and floor on unstable steps: measured ≤ 2.9e-3
STABLE = {  # bounds on the other guided steps, ≈ 10x the worst measured
    "g64": 8e-5,  # measured ≤ 8.3e-6
    "floor": 7e-5,  # measured ≤ 6.9e-6
    "g32": 9e-5,  # measured ≤ 8.7e-6
    "eps_final": 9e-5,  # measured ≤ 8.8e-6
}


def _distances(row, r64) -> dict[str, float]:
    return {"g32": row.guider_grad, "g64": r64.guider_grad, "floor": rel_err(row.guider_grad_value, r64.guider_grad_value),
            "eps_final": row.eps_final}


def _float32_unstable(d: dict[str, float]) -> bool:
    """A float32-unstable step: our or the golden run's float32 error above UNSTABLE."""
    return max(d["g64"], d["floor"]) > UNSTABLE


def _unstable_bound(d: dict[str, float]) -> float:
    """The bound of a float32-unstable step: twice our and the golden run's float32 errors together."""
    return max(1e-3, 2 * (d["floor"] + d["g64"]))


def assert_guided_steps_within_float32_noise(rows, rows64, stable_grad: float, stable_final: float,
                                              unguided_final: float) -> None:
    """Each guided step's gradient and ε_final within ``stable_*`` of golden, or, on float32-unstable steps
    (our float64 reference ``rows64`` decides), within :func:`_unstable_bound`; at most MAX_UNSTABLE_STEPS
    such steps, each capped; unguided steps' ε_final within ``unguided_final``."""
    unstable = []
    for row in rows:
        if row.guider_grad_value is None:
            assert row.eps_final <= unguided_final, f"unguided step {row.step}: eps_final {row.eps_final:.2e}"
            continue
        d = _distances(row, rows64[row.step])
        grad_bound, final_bound = stable_grad, stable_final
        if _float32_unstable(d):
            unstable.append(row.step)
            assert d["g64"] <= UNSTABLE_CAP and d["floor"] <= UNSTABLE_CAP, f"step {row.step}: {d}"
            grad_bound = final_bound = _unstable_bound(d)
        assert row.guider_grad <= grad_bound, f"step {row.step}: {row.guider_grad:.2e} > {grad_bound:.2e} ({d})"
        assert row.eps_final <= final_bound, f"step {row.step}: eps_final {row.eps_final:.2e} > {final_bound:.2e}"
    assert len(unstable) <= MAX_UNSTABLE_STEPS, f"float32-unstable steps {unstable}"


def test_float64_reference_matches_golden(reference_rows, reference_rows64):
    """The premise of the float32-noise bound: our float64 gradient is the value the golden float32 run
    approximates (g64 small), except on the few float32-unstable steps, whose number and size are capped."""
    unstable = []
    for row in reference_rows:
        if row.guider_grad_value is None:
            continue
        r64 = reference_rows64[row.step]
        assert r64.grad_presence_matches, row.step
        d = _distances(row, r64)
        if _float32_unstable(d):
            unstable.append(row.step)
            assert d["g64"] <= UNSTABLE_CAP and d["floor"] <= UNSTABLE_CAP, f"step {row.step}: {d}"
        else:
            assert d["g64"] <= STABLE["g64"] and d["floor"] <= STABLE["floor"], f"step {row.step}: {d}"
    assert len(unstable) <= MAX_UNSTABLE_STEPS, f"float32-unstable steps {unstable}"


def test_reference_guider_gradient_within_float32_noise(reference_rows, reference_rows64):
    assert_guided_steps_within_float32_noise(reference_rows, reference_rows64, STABLE["g32"], STABLE["eps_final"], 1e-4)


def test_fast_step_terms_teacher_forced(golden_editor, golden, reference_rows64):
    """UNet terms within 1e-4; guider gradient and ε_final within 1e-3 of golden on each guided step, or
    within the float32-unstable bound where our float64 reference says float32 is unstable (the same
    math as the reference step, so its float64 run is the truth for both)."""
    rows = teacher_forced_edit(golden_editor, golden, fast_step)
    summary = summarize(rows)
    assert summary["grad_presence_mismatches"] == 0
    assert summary["eps_u"] <= 1e-4 and summary["delta_cfg"] <= 1e-4 and summary["gamma"] <= 1e-4
    assert_guided_steps_within_float32_noise(rows, reference_rows64, 1e-3, 1e-3, 1e-3)


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
def test_compiled_fast_step_terms_teacher_forced(golden_editor_compiled, golden, reference_rows64):
    """The eager fast step's bounds; on float32-unstable steps (as defined above, by our float64
    reference) the guider gradient and ε_final get the FlashAttention rule instead of 1e-3.
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
    assert_guided_steps_within_float32_noise(rows, reference_rows64, 1e-3, 1e-3, 1e-3)


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
    pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'gnr-fast[export]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'gnr-fast[export]')")
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
