"""Edit cases, preservation metrics and the quality report of the shapes-world benchmark."""

import math

import numpy as np
import pytest

from gnr_shapes.evaluation.cases import EDIT_KINDS, make_case, make_cases
from gnr_shapes.evaluation.metrics import masked_psnr, masked_ssim
from gnr_shapes.evaluation.methods import METHODS
from gnr_shapes.evaluation.quality import markdown_table, summary_rows
from gnr_shapes.evaluation.report import CaseResult, picture_grid


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_cases_change_only_the_change_mask(kind):
    case = make_case(kind, 9_000_001)
    assert case.source.caption != case.target.caption
    differs = np.any(case.source.image != case.target.image, axis=-1)
    assert differs.any()
    assert not (differs & case.keep_mask).any()  # everything that changed lies inside the change mask
    assert math.isinf(masked_psnr(case.target.image, case.source.image, case.keep_mask))
    assert case.keep_mask.any()


def test_cases_are_deterministic_and_distinct():
    a, b = make_cases("colour", 3), make_cases("colour", 3)
    assert [c.target.caption for c in a] == [c.target.caption for c in b]
    assert len({c.source.caption for c in a}) > 1


def test_edit_kinds_change_the_named_attribute():
    colour = make_case("colour", 9_000_002)
    assert colour.source.spec.objects[0].colour != colour.target.spec.objects[0].colour
    assert colour.source.spec.objects[0].shape == colour.target.spec.objects[0].shape
    shape = make_case("shape", 9_000_002)
    assert shape.source.spec.objects[0].shape != shape.target.spec.objects[0].shape
    bg = make_case("background", 9_000_002)
    assert bg.source.spec.background != bg.target.spec.background
    assert bg.source.spec.objects == bg.target.spec.objects


def test_masked_psnr_and_ssim():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[:8] += 10  # top half differs by 10 levels
    top = np.zeros((16, 16), bool)
    top[:8] = True
    assert masked_psnr(a, b, top) == pytest.approx(10 * math.log10(255**2 / 100))
    assert math.isinf(masked_psnr(a, b, ~top))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    full = np.ones((32, 32), bool)
    assert masked_ssim(noise, noise, full) == pytest.approx(1.0)
    assert masked_ssim(noise, 255 - noise, full) < 0.1


def test_report_table_and_grid():
    cases = [make_case("colour", 9_000_000 + i, size=64) for i in range(2)]
    results = [
        CaseResult(c.kind, c.seed, m, success=(m == "gar"), psnr_keep=30.0, ssim_keep=0.9, perceptual=0.1,
                   seconds=1.0, image=c.target.image)
        for c in cases for m in ("baseline", "gar")
    ]
    rows = summary_rows(results)
    assert [(r["method"], r["success"]) for r in rows] == [("baseline", 0.0), ("gar", 1.0)]
    assert "| colour | gar | 2 | 100 % |" in markdown_table(rows)
    grid = picture_grid(cases, results, rows_per_kind=2)
    assert grid.size == (4 * 64, 14 + 2 * 64)


def test_parallel_evaluation_equals_in_process(tiny_model_path, tiny_editor):
    from gnr_shapes.evaluation.quality import evaluate, evaluate_parallel
    from gnr_shapes.world.judge import load_judge

    kwargs = dict(kinds=("colour", "shape"), per_kind=1, num_steps=2)
    cases, serial = evaluate(tiny_editor, load_judge(), methods={"baseline": METHODS["baseline"]}, progress=False, **kwargs)
    cases_p, parallel = evaluate_parallel(str(tiny_model_path), 2, method_names=("baseline",), progress=False, **kwargs)
    assert [c.seed for c in cases] == [c.seed for c in cases_p]
    assert [(r.kind, r.seed, r.method) for r in serial] == [(r.kind, r.seed, r.method) for r in parallel]
    for a, b in zip(serial, parallel):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
        assert a.success == b.success


def test_parallel_evaluation_rejects_unknown_methods():
    from gnr_shapes.evaluation.quality import evaluate_parallel

    with pytest.raises(ValueError, match="unknown methods"):
        evaluate_parallel(None, 2, method_names=("nope",))
