"""fp16 and bf16 edits against fp32 through the public API (docs/precision.md §7).

Guidance is chaotic under rounding, so the bounds are on quality, not parity: the final latent's
relative distance and the image's PSNR to the fp32 edit, and the relative L2 distance of the first
guider gradient (step 1; step 0 pairs z with itself) to fp32's. Each low-precision editor inverts the
image itself, as a user's would. Bounds are ≈ 10× the measured error (comments).
"""

import math

import numpy as np
import pytest
import torch

from gnr_fast import Editor
from gnr_shapes.evaluation.metrics import masked_psnr
from parity import rel_err

STEPS = 6
SOURCE, TARGET = "a red circle", "a green square"

# Measured on the tiny pipeline (6 steps, nonstyle; fast / reference; Zen 4, 2026-12-0x):
#   fp16: latent_rel 0.026 / 0.028, PSNR to fp32 44.7 / 44.3 dB, step-1 cosine 0.9995 / 0.9994
#   bf16: latent_rel 0.19 / 0.23, PSNR 26.4 / 25.1 dB, cosine 0.975 / 0.960
# (bf16's 8-bit mantissa in the UNet itself; with the loop in fp32 it measured 0.18 / 0.13, 27 / 30 dB).
# 2026-12-07, Xeon with native bf16, fast mode: fp16 latent_rel 0.029, 43.1 dB, step-1 gradient relative
# L2 distance 5.5e-2 (cosine 0.9994); bf16 0.239, 25.3 dB, 0.56 (cosine 0.956: the norms differ too).
# A cosine bound let a ~10 % gradient error pass; the distance bounds are 2-4x the measured.
BOUNDS = {
    torch.float16: {"latent_rel": 0.1, "psnr_db": 34.0, "grad_rel": 0.2},
    torch.bfloat16: {"latent_rel": 0.6, "psnr_db": 20.0, "grad_rel": 1.0},
}


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    yy, xx = np.mgrid[:64, :64]
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[...] = (30, 60, 200)
    rgb[(yy - 32) ** 2 + (xx - 30) ** 2 < 225] = (220, 30, 30)
    return Image.fromarray(rgb)


def edit_with_first_gradient(editor, image, mode, preset="nonstyle", steps=STEPS, source=SOURCE, target=TARGET):
    """The edit and the guider gradient of its first step that has one (step ≥ 1)."""
    grads = {}

    def record(step, t, z, terms):
        if terms.guider_grad is not None and not grads:
            grads[step] = terms.guider_grad.detach().double().clone()

    inversion = editor.invert(image, source, num_steps=steps, progress=False)
    result = editor.edit(inversion, target, preset=preset, mode=mode, progress=False, callback=record)
    return result, grads


@pytest.fixture(scope="module")
def fp32_edits(tiny_editor, image):
    return {mode: edit_with_first_gradient(tiny_editor, image, mode) for mode in ("fast", "reference")}


@pytest.mark.parametrize("mode", ["fast", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_edit_is_finite_and_near_fp32(tiny_model_path, image, fp32_edits, dtype, mode):
    ref, ref_grads = fp32_edits[mode]
    editor = Editor.from_pretrained(tiny_model_path, dtype=dtype)
    assert editor.model_id == ref.inversion.model_id  # one model in every dtype
    result, grads = edit_with_first_gradient(editor, image, mode)
    assert torch.isfinite(result.latents).all()
    bound = BOUNDS[dtype]
    latent_rel = float((result.latents.double() - ref.latents.double()).norm() / ref.latents.double().norm())
    assert latent_rel < bound["latent_rel"]
    a, b = np.asarray(result.image), np.asarray(ref.image)
    assert masked_psnr(a, b, np.ones(a.shape[:2], bool)) > bound["psnr_db"]
    assert a.std() > 1.0  # not a flat (black) image
    (step,) = ref_grads
    assert step >= 1 and step in grads
    assert rel_err(grads[step], ref_grads[step]) < bound["grad_rel"]


# --- bundled model: edit quality in low precision -------------------------------------------------

BUNDLED_STEPS = 20
BUNDLED_CASES = (("colour", 9_000_000), ("shape", 9_000_001), ("background", 9_000_002))
# Measured (20 steps, `shapes`; judge verdict, kept-region PSNR to the source; fast / reference;
# this branch's code; † = last session's run, not repeated):
#   colour 9000000:     fp32 success 31.35 / 31.35 dB; fp16 success 38.66 / 38.0† dB; bf16 success 34.14 / 32.8† dB
#   shape 9000001:      fp32 success 36.04 / 36.04 dB; fp16 success 35.93† / 35.41 dB; bf16 success 36.60 / 37.00 dB
#   background 9000002: fp32 fails 6.92 / 6.92 dB;     fp16 fails 6.97 / 6.94 dB;       bf16 fails 7.23 / 7.36 dB
#   step-1 cosine to fp32, fp16: colour 0.99974 / 0.99952†, shape 0.99945† / 0.99955, background 0.99944 / 0.99952;
#                           bf16: colour 0.99574 / 0.99594†, shape 0.99009 / 0.99024, background 0.99023 / 0.99000.
#   fp16 fast: each case's loss scale backed off once (2^10 -> 2^6). Final latents 10-45 % from fp32.
# Verdicts all equal fp32's; the largest PSNR drop is 0.62 dB (MSE x 1.15); the bound allows 3 dB (MSE x 2).
BUNDLED_PSNR_DROP_DB = 3.0
# Step-1 gradient's relative L2 distance to fp32 (2026-12-07, Xeon with native bf16, fast / reference):
#   fp16: colour 0.024 / 0.022, shape 0.031 / 0.034, background 0.029 / 0.028;
#   bf16: colour 0.089 / 0.079, shape 0.146 / 0.128, background 0.161 / 0.122.
# The bounds are ~4x the worst (the cosine bound of 0.9 it replaces let a ~45 % gradient error pass).
BUNDLED_GRAD_REL = {torch.float16: 0.15, torch.bfloat16: 0.6}


@pytest.fixture(scope="module")
def judge():
    from gnr_shapes.world.judge import load_judge

    return load_judge()


@pytest.fixture(scope="module")
def bundled_edits(judge):
    """(success, kept-region PSNR, step-1 gradients) of each (dtype, mode, case), computed once."""
    from gnr_shapes.evaluation.cases import make_case
    from gnr_shapes.evaluation.quality import judge_success

    editors: dict = {}
    done: dict = {}

    def edit(dtype, mode, kind, seed):
        if (dtype, mode, kind) not in done:
            editor = editors.setdefault(dtype, Editor.from_pretrained(None, dtype=dtype))
            case = make_case(kind, seed)
            result, grads = edit_with_first_gradient(
                editor, case.source.image, mode, preset="shapes", steps=BUNDLED_STEPS,
                source=case.source.caption, target=case.target.caption,
            )
            assert torch.isfinite(result.latents).all(), (dtype, mode, kind)
            image = np.asarray(result.image)
            done[dtype, mode, kind] = (judge_success(judge, image, case), masked_psnr(image, case.source.image, case.keep_mask), grads)
        return done[dtype, mode, kind]

    return edit


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_bundled_model_edits_in_low_precision(bundled_edits, dtype, mode):
    """The ``shapes`` preset on three held-out cases: the judge's verdicts, the kept region's PSNR to
    the source and the step-1 gradient's relative distance stay within the measured bounds of fp32's."""
    successes = {torch.float32: 0, dtype: 0}
    for kind, seed in BUNDLED_CASES:
        (ok32, psnr32, grads32), (ok, psnr, grads) = (bundled_edits(d, mode, kind, seed) for d in (torch.float32, dtype))
        successes[torch.float32] += ok32
        successes[dtype] += ok
        assert math.isfinite(psnr) and psnr > psnr32 - BUNDLED_PSNR_DROP_DB, (kind, psnr, psnr32)
        (step,) = grads32
        grad_rel = rel_err(grads[step], grads32[step])
        print(f"bundled {dtype} {mode} {kind}: success {ok} (fp32 {ok32}), kept PSNR {psnr:.2f} (fp32 {psnr32:.2f}) dB, "
              f"step-{step} gradient relative L2 {grad_rel:.4f}")
        assert grad_rel < BUNDLED_GRAD_REL[dtype], (kind, grad_rel)
    assert successes[dtype] >= successes[torch.float32] - 1
