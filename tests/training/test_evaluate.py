"""Smoke test of ``python -m gnr_shapes.training.evaluate`` on the bundled model (a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gnr_fast.loading import BUNDLED_MODEL
from gnr_shapes.training import evaluate


@pytest.mark.parametrize("caption_set", ["test", "tune"])
def test_evaluate_writes_every_metric(tmp_path: Path, caption_set: str) -> None:
    if not (BUNDLED_MODEL / "model_index.json").exists():
        pytest.skip(f"bundled model missing at {BUNDLED_MODEL}")
    out = tmp_path / "metrics.json"
    evaluate.main(["--model", str(BUNDLED_MODEL), "--captions", "2", "--inversions", "1", "--steps", "2",
                   "--batch", "2", "--threads", "1", "--caption-set", caption_set, "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["caption_set"] == caption_set
    for key in ("fidelity_all_stated", "fidelity_all_stated_strict_order", "fidelity_all",
                "fidelity_background_colours", "fidelity_main_shape"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["fidelity_all_stated_strict_order"] <= metrics["fidelity_all_stated"]
    per_kind = {k.removeprefix("captions_background_"): n for k, n in metrics.items() if k.startswith("captions_background_")}
    assert sum(per_kind.values()) == 2
    for kind in per_kind:  # colours as the caption states them (any order for stripes/checks) >= in rendered order
        assert 0.0 <= metrics[f"fidelity_background_colours_{kind}"] <= metrics[
            f"fidelity_background_colours_as_stated_{kind}"] <= 1.0
    assert 5.0 < metrics["vae_only_psnr_db"] < 60.0 and 0.0 < metrics["inversion_psnr_db"] < 60.0


def test_tuning_captions_are_disjoint_from_the_reported_ones() -> None:
    test_first = evaluate.HELD_OUT_SEED_START + evaluate.CAPTION_SETS["test"]
    tune_first = evaluate.HELD_OUT_SEED_START + evaluate.CAPTION_SETS["tune"]
    inversion_first = evaluate.HELD_OUT_SEED_START + evaluate.INVERSION_SEED_OFFSET
    # 200 captions are reported; the ranges must not overlap for the largest count the CLI is run with.
    span = 100_000
    starts = sorted([test_first, tune_first, inversion_first])
    assert all(b - a >= span for a, b in zip(starts, starts[1:]))
