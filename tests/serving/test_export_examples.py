"""The examples under ``export/`` are what the export commands write today (``export/examples.py``
regenerates them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXPORT = Path(__file__).resolve().parents[2] / "export"


def _examples_module():
    spec = importlib.util.spec_from_file_location("export_examples", EXPORT / "examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_examples_under_export_are_current(tmp_path):
    examples = _examples_module()
    written = examples.write_examples(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in written} >= {
        "triton_repo/cpu/gnr_edit/config.pbtxt", "triton_repo/gpu/gnr_edit/1/model.py", "tensorrt/profiles.json"}
    stale = [str(p.relative_to(tmp_path)) for p in written
             if not (EXPORT / p.relative_to(tmp_path)).is_file()
             or (EXPORT / p.relative_to(tmp_path)).read_bytes() != p.read_bytes()]
    extra = [str(p.relative_to(EXPORT)) for folder in examples.TRITON_REPOS for p in (EXPORT / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and tmp_path / p.relative_to(EXPORT) not in written]
    assert not stale and not extra, f"export/ examples out of date (run python export/examples.py): stale {stale}, extra {extra}"


def test_the_profiles_cover_every_plain_call_of_the_presets():
    table = json.loads((EXPORT / "tensorrt" / "profiles.json").read_text())
    for label, (profile,) in table["profiles"].items():
        assert 1 == profile["min_batch"] <= profile["opt_batch"] <= profile["max_batch"] <= table["export"]["batch"][1], label
        assert profile["shapes"]["sample"][2] == [profile["max_batch"], 4, 64, 64], label
