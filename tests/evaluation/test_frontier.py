"""The quality/latency frontier (issue 35): fewer-step DDIM and consistency methods, the inversion
reconstruction, and the frontier's table and plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gnr_fast.config import CfgGuider, EditConfig, FeaturesMapL2, SelfAttnMapL2
from gnr_fast.errors import ConfigError
from gnr_shapes.evaluation.cases import make_case
from gnr_shapes.evaluation.frontier import (
    SAMPLER_COLOURS,
    frontier_axes,
    frontier_plot,
    frontier_rows,
    frontier_table,
    issue_bars,
)
from gnr_shapes.evaluation.methods import (
    FRONTIER_METHODS,
    METHODS,
    ConsistencyOptions,
    config_at_steps,
    kept_steps,
    load_consistency_editors,
    method_config,
    reconstruction_config,
    skip_boundaries,
)
from gnr_shapes.evaluation.quality import main, reconstruction_psnr, run_case
from gnr_shapes.evaluation.report import CaseResult, case_records


def test_fewer_consistency_steps_keep_every_other_boundary():
    assert skip_boundaries((259, 519, 779, 999), 2) == (519, 999)
    assert skip_boundaries((259, 519, 779, 999), 4) == (259, 519, 779, 999)
    assert skip_boundaries((259, 519, 779, 999), 1) == (999,)
    with pytest.raises(ConfigError, match="divisor"):
        skip_boundaries((259, 519, 779, 999), 3)
    # editing step i of the 4-step edit starts at boundary 3 - i: 999 (step 0) and 519 (step 2) stay
    assert kept_steps(4, 2) == (0, 2)
    assert kept_steps(4, 4) == (0, 1, 2, 3)


def test_consistency_preset_at_two_steps_keeps_the_kept_steps_values():
    two = config_at_steps(EditConfig.consistency(), kept_steps(4, 2))
    assert two.num_steps == 2
    by_type = {type(g): g for g in two.guiders}
    assert by_type[CfgGuider].scale == (0.0, 11.0)  # w of steps 0 and 2 of (0, 7, 11, 19)
    assert by_type[SelfAttnMapL2].scale == (0.0, 20000.0)
    assert by_type[FeaturesMapL2].scale == 0.5  # a constant scale stays
    assert two.rescale == EditConfig.consistency().rescale


def test_method_configs():
    preset = EditConfig.consistency()
    cfg_only = method_config(METHODS["cons-cfg-4"], 4, preset)
    assert [type(g) for g in cfg_only.guiders] == [CfgGuider]
    assert cfg_only.guiders[0].scale == (0.0, 7.0, 11.0, 19.0)
    assert cfg_only.rescale.kind == "identity_rescaler"
    assert method_config(METHODS["cons-gar-4"], 4, preset) == preset
    assert method_config(METHODS["gar-shapes-5"], METHODS["gar-shapes-5"].num_steps(50)) == EditConfig.shapes(5)
    assert METHODS["gar-shapes"].num_steps(50) == 50
    with pytest.raises(ConfigError, match="consistency preset"):
        method_config(METHODS["cons-gar-2"], 2, None)
    assert all(m in METHODS for m in FRONTIER_METHODS)


def _result(method: str, sampler: str, kind: str, seed: int, success: bool, psnr: float, seconds: float) -> CaseResult:
    image = np.zeros((8, 8, 3), np.uint8)
    return CaseResult(kind, seed, method, success, psnr, 0.9, 0.1, seconds, image, sampler=sampler, steps=4,
                      first_edit_seconds=seconds + 1.0, inversion_psnr=30.0)


def test_frontier_rows_table_and_plot():
    results = [
        _result("slow", "ddim", "colour", 1, True, 30.0, 4.0),
        _result("slow", "ddim", "colour", 2, True, 28.0, 4.0),
        _result("slow", "ddim", "shape", 1, False, 20.0, 6.0),
        _result("fast", "consistency", "colour", 1, False, 16.0, 0.5),
        _result("fast", "consistency", "shape", 1, True, math.inf, 0.5),  # identical images: left out of the mean
    ]
    slow, fast = frontier_rows(case_records(results))
    assert (slow["method"], slow["sampler"], slow["n"]) == ("slow", "ddim", 3)
    assert slow["success"] == pytest.approx({"colour": 1.0, "shape": 0.0, "all": 2 / 3})
    assert slow["psnr_keep_db"] == pytest.approx({"colour": 29.0, "shape": 20.0, "all": 26.0})
    assert slow["seconds"] == pytest.approx(14 / 3) and slow["first_edit_seconds"] == pytest.approx(17 / 3)
    assert fast["psnr_keep_db"]["all"] == pytest.approx(16.0)
    table = frontier_table([slow, fast])
    assert "| slow | ddim | 4 | 3 | 100 / 0 % | 67 % | 29.0 / 20.0 | 26.0 | 30.0 | 4.67 | 5.67 |" in table
    plot = np.asarray(frontier_plot([slow, fast]))
    axes = frontier_axes([slow, fast])
    for row in (slow, fast):
        x, y = axes.to_pixel(row["first_edit_seconds"], row["psnr_keep_db"]["all"])
        assert tuple(plot[y, x]) == SAMPLER_COLOURS[row["sampler"]]
    fast_x, _ = axes.to_pixel(fast["first_edit_seconds"], 20.0)
    slow_x, _ = axes.to_pixel(slow["first_edit_seconds"], 20.0)
    assert fast_x < slow_x  # fewer seconds further left
    # the bars compare the cases both methods edited: colour 1 and shape 1 (not colour 2)
    bars = issue_bars(case_records(results), reference="slow", candidate="fast")
    assert "the 2 cases both edited" in bars
    assert "PSNR -9.0 dB (misses" in bars and "success +0 points (meets" in bars and "4.0x faster (misses" in bars
    assert issue_bars(case_records(results), reference="slow", candidate="other") == ""


def test_frontier_merges_runs(tmp_path):
    from gnr_shapes.evaluation.frontier import main as merge

    runs = []
    for name, sampler in (("slow", "ddim"), ("fast", "consistency")):
        cases = case_records([_result(name, sampler, "colour", 1, True, 25.0, 2.0)])
        runs.append(tmp_path / f"{name}.json")
        runs[-1].write_text(json.dumps({"context": f"{name} run", "rows": [], "cases": cases}))
    out = tmp_path / "merged"
    assert merge([*map(str, runs), "--out", str(out)]) == 0
    merged = json.loads((out / "frontier.json").read_text())
    assert [r["method"] for r in merged["rows"]] == ["slow", "fast"]
    assert "slow run" in merged["context"] and "fast run" in merged["context"]
    assert (out / "frontier.png").is_file() and not (out / "frontier_grid.png").exists()
    with pytest.raises(SystemExit):  # a method from two runs
        merge([str(runs[0]), str(runs[0]), "--out", str(out)])
    assert merge([f"{runs[1]}:fast", "--out", str(out)]) == 0  # one method of a run
    assert [r["method"] for r in json.loads((out / "frontier.json").read_text())["rows"]] == ["fast"]
    with pytest.raises(SystemExit):  # a method the run does not have
        merge([f"{runs[1]}:slow", "--out", str(out)])


def test_fewer_step_ddim_method_and_its_reconstruction(tiny_editor):
    from gnr_shapes.world.judge import load_judge

    case = make_case("colour", 9_000_000, size=tiny_editor.components.unet.config.sample_size
                     * tiny_editor.components.latent_factor)
    (result,) = run_case(tiny_editor, load_judge(), case, 50, {"gar-shapes-5": METHODS["gar-shapes-5"]},
                         reconstruct=True)
    assert (result.method, result.sampler, result.steps) == ("gar-shapes-5", "ddim", 5)
    assert result.first_edit_seconds > result.seconds > 0
    inversion = tiny_editor.invert(case.source.image, case.source.caption, num_steps=5, progress=False)
    rebuilt = tiny_editor.edit(inversion, case.source.caption, config=reconstruction_config("ddim", 5), progress=False)
    assert result.inversion_psnr == reconstruction_psnr(np.asarray(rebuilt.image), case)  # deterministic: equal


def test_consistency_methods_on_one_case(golden_dir):
    from gnr_shapes.world.judge import load_judge

    icd = golden_dir / "tiny-icd"
    options = ConsistencyOptions(str(icd / "teacher.pt"), str(icd / "reverse_lora.safetensors"),
                                 str(icd / "forward_lora.safetensors"))
    consistency = load_consistency_editors(icd, (4, 2), options)
    assert consistency.editors[2].fixed_sampler.boundaries == (519, 999)
    assert consistency.editors[4].fixed_sampler.boundaries == (259, 519, 779, 999)
    assert consistency.preset == EditConfig.consistency()  # the model's consistency preset: no gnr_fast.json names one
    editor = consistency.editors[4]
    case = make_case("colour", 9_000_000, size=editor.components.unet.config.sample_size * editor.components.latent_factor)
    names = ("cons-gar-4", "cons-cfg-4", "cons-gar-2")
    results = run_case(None, load_judge(), case, 50, {m: METHODS[m] for m in names}, consistency=consistency,
                       reconstruct=True)
    assert [(r.method, r.sampler, r.steps) for r in results] == [
        ("cons-gar-4", "consistency", 4), ("cons-cfg-4", "consistency", 4), ("cons-gar-2", "consistency", 2)]
    assert all(r.first_edit_seconds > r.seconds > 0 for r in results)
    assert results[0].inversion_psnr == results[1].inversion_psnr  # one 4-step inversion, one reconstruction
    assert math.isfinite(results[2].inversion_psnr) and results[2].inversion_psnr != results[0].inversion_psnr
    assert np.abs(results[0].image.astype(int) - results[1].image.astype(int)).max() > 0  # the guiders act


def test_eval_frontier_writes_table_plot_and_json(tiny_model_path, tmp_path):
    out = tmp_path / "frontier"
    assert main(["--model", str(tiny_model_path), "--frontier", "--methods", "gar-shapes-5", "--kinds", "colour",
                 "--per-kind", "1", "--out", str(out)]) == 0
    data = json.loads((out / "frontier.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["gar-shapes-5"]
    assert math.isfinite(data["rows"][0]["inversion_psnr_db"])
    assert "load average" in data["context"]
    assert "| gar-shapes-5 | ddim | 5 | 1 |" in (out / "frontier.md").read_text()
    assert (out / "frontier.png").stat().st_size > 0 and (out / "frontier_grid.png").stat().st_size > 0
