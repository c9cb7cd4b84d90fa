"""The seams between the engine (``gnr_fast``) and the bundled model's own package (``gnr_shapes``):
caption grammars found through the ``gnr_fast.caption_grammars`` entry points, and ``gnr-fast eval``
imported by name (docs/architecture.md, "Package layout")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gnr_fast import cli
from gnr_fast.caption_grammars import ENTRY_POINT_GROUP, grammar_names, grammar_reader, register_grammar
from gnr_fast.errors import ModelLoadError
from gnr_fast.model_defaults import METADATA_NAME, CaptionGrammar, load_model_defaults
from gnr_fast.prompts import prompt_form
from gnr_shapes.world import captions


def test_the_shapes_grammar_comes_from_its_entry_point():
    assert "shapes-world" in grammar_names()
    assert grammar_reader("shapes-world") is captions.prompt_form


def test_importing_the_engine_imports_no_grammar_package():
    code = "import sys, gnr_fast, gnr_fast.cli, gnr_fast.prompts; print(sorted(m for m in sys.modules if m.startswith('gnr_shapes')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_an_unknown_grammar_is_a_model_load_error(tmp_path):
    grammar = {"name": "klingon", "summary": "s", "grammar": "g", "examples": ["a"]}
    (tmp_path / METADATA_NAME).write_text(json.dumps({"format": 1, "caption_grammar": grammar}))
    with pytest.raises(ModelLoadError, match=rf"{METADATA_NAME}.*'klingon' is not provided.*{ENTRY_POINT_GROUP}"):
        load_model_defaults(tmp_path)


def test_a_registered_grammar_reads_prompts(tmp_path):
    register_grammar("test-yes-no", lambda prompt: "grammar" if prompt == "yes" else "outside")
    grammar = {"name": "test-yes-no", "summary": "s", "grammar": "g", "examples": ["yes"]}
    (tmp_path / METADATA_NAME).write_text(json.dumps({"format": 1, "caption_grammar": grammar}))
    loaded = load_model_defaults(tmp_path).caption_grammar
    assert loaded == CaptionGrammar("test-yes-no", "s", "g", ("yes",))
    assert [prompt_form(loaded, p) for p in ("yes", "no", " ")] == ["grammar", "outside", None]


def test_eval_without_its_package_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "EVAL_PACKAGE", "gnr_no_such_package")
    assert cli.main(["eval", "--help"]) == 2
    assert "'gnr-fast eval' needs the gnr_no_such_package package" in capsys.readouterr().err
