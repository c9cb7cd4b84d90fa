"""The prompt-robustness benchmark: prompts per caption form, the summary, one real tiny run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gnr_shapes.evaluation.cases import make_case
from gnr_shapes.evaluation.report import CaseResult
from gnr_shapes.evaluation.robustness import case_prompts, markdown_table, summary_rows
from gnr_shapes.world.captions import CAPTION_FORMS, parse_caption, parse_prompt


@pytest.mark.parametrize("kind", ["colour", "shape", "background"])
def test_prompts_of_every_form_state_the_edit(kind):
    case = make_case(kind, 9_000_003)
    full = case_prompts(case, "full")
    assert full == (case.source.caption, case.target.caption)
    for form in CAPTION_FORMS:
        source, target = case_prompts(case, form)
        assert source != target
        parsed_source, parsed_target = parse_prompt(source), parse_prompt(target)
        truth_source, truth_target = parse_caption(full[0]), parse_caption(full[1])
        for parsed, truth in ((parsed_source, truth_source), (parsed_target, truth_target)):
            assert parsed is not None, (form, source, target)
            assert (parsed.background_kind, parsed.background_colours) == (
                truth.background_kind, truth.background_colours)
            assert [(o.colour, o.shape) for o in parsed.objects] == [(o.colour, o.shape) for o in truth.objects]
        if form != "full" and form != "synonym":
            assert "large" not in source and "small" not in source  # relaxed forms drop the size word


def test_synonym_form_uses_the_same_draw_for_source_and_target():
    case = make_case("shape", 9_000_000)
    assert case_prompts(case, "synonym") == case_prompts(case, "synonym")
    source, target = case_prompts(case, "synonym")
    assert source.split(" on ")[1] == target.split(" on ")[1]  # background unchanged


def _result(kind, form, method, success, psnr):
    return CaseResult(kind=kind, seed=0, method=method, success=success, psnr_keep=psnr, ssim_keep=0.5,
                      perceptual=0.1, seconds=1.0, image=np.zeros((1, 1, 3), np.uint8), form=form)


def test_summary_reports_each_form_against_full_captions():
    results = [_result("colour", "full", "gar-shapes", True, 30.0), _result("colour", "full", "gar-shapes", False, 28.0),
               _result("colour", "no_size", "gar-shapes", True, 20.0), _result("colour", "no_size", "gar-shapes", True,
                                                                                math.inf)]
    rows = summary_rows(results)
    by_form = {r["form"]: r for r in rows}
    assert by_form["full"]["success"] == 0.5 and by_form["full"]["psnr_keep_db"] == 29.0
    assert by_form["no_size"]["success"] == 1.0 and by_form["no_size"]["psnr_keep_db"] == 20.0  # inf skipped
    assert by_form["no_size"]["psnr_vs_full_db"] == -9.0 and by_form["full"]["psnr_vs_full_db"] == 0.0
    table = markdown_table(rows)
    assert "| colour | no_size | gar-shapes | 2 | 100 % | 20.0 | -9.0 |" in table


def test_a_tiny_run_scores_every_form(tiny_editor):
    from gnr_shapes.evaluation.robustness import evaluate_forms
    from gnr_shapes.world.judge import load_judge

    forms = ("full", "comma")
    results = evaluate_forms(tiny_editor, load_judge(), kinds=("colour",), per_kind=1, num_steps=2,
                             forms=forms, progress=False)
    assert [(r.form, r.method) for r in results] == [(f, m) for f in forms for m in ("baseline-cfg4", "gar-shapes")]
    assert all(np.isfinite(r.psnr_keep) and r.image.shape == (64, 64, 3) for r in results)
