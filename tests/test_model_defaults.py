"""Model defaults that travel with the model folder (gnr_fast.json): loading, precedence, CLI,
server, and the caption-grammar warning."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from gnr_fast import ConfigError, Editor
from gnr_fast.config import EditConfig
from gnr_fast.errors import ModelLoadError
from gnr_fast.loading import BUNDLED_MODEL
from gnr_fast.model_defaults import (
    FALLBACK_PRESET,
    METADATA_NAME,
    ModelDefaults,
    load_model_defaults,
)
from gnr_fast.caption_grammars import grammar_names
from gnr_fast.prompts import (
    PromptGrammarWarning,
    warn_if_outside_grammar,
)
from gnr_shapes.world import generate_scene, parse_caption
from gnr_shapes.world.captions import CAPTION_FORMS, caption_in_form

GOOD = {"format": 1, "preset": "style"}


@pytest.fixture(scope="module")
def model_with_defaults(tiny_model_path, tmp_path_factory):
    """A copy of the tiny pipeline whose gnr_fast.json declares the ``style`` preset."""
    folder = tmp_path_factory.mktemp("tiny-with-defaults") / "model"
    shutil.copytree(tiny_model_path, folder)
    (folder / METADATA_NAME).write_text(json.dumps(GOOD))
    return folder


def test_bundled_model_declares_shapes_and_its_grammar():
    defaults = load_model_defaults(BUNDLED_MODEL)
    assert defaults.preset == "shapes"
    assert defaults.source == BUNDLED_MODEL / METADATA_NAME
    grammar = defaults.caption_grammar
    assert grammar is not None and grammar.name in grammar_names()
    for example in grammar.examples:  # every example is a caption of the training grammar
        parse_caption(example)


def test_absent_metadata_gives_the_fallback(tiny_model_path):
    assert not (tiny_model_path / METADATA_NAME).exists()
    assert load_model_defaults(tiny_model_path) == ModelDefaults()
    assert ModelDefaults().preset == FALLBACK_PRESET == "nonstyle"


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("{not json", ModelLoadError, "cannot read model metadata"),
        ("[1, 2]", ModelLoadError, "must hold a JSON object"),
        (json.dumps({"format": 2, "preset": "shapes"}), ModelLoadError, "'format' must be 1"),
        (json.dumps({"format": 1, "preset": "vivid"}), ConfigError, "preset 'vivid' is unknown"),
        (json.dumps({"format": 1, "prest": "shapes"}), ModelLoadError, r"unknown key\(s\) \['prest'\]"),
        (json.dumps({"format": 1, "caption_grammar": "shapes"}), ModelLoadError, "must be an object"),
        (json.dumps({"format": 1, "caption_grammar": {"name": "x", "summary": "s", "grammar": "g",
                                                      "examples": []}}), ModelLoadError, "non-empty list"),
        (json.dumps({"format": 1, "caption_grammar": {"name": "", "summary": "s", "grammar": "g",
                                                      "examples": ["a"]}}), ModelLoadError, "caption_grammar.name"),
    ],
)
def test_malformed_metadata_is_a_clear_error(tmp_path, text, error, match):
    (tmp_path / METADATA_NAME).write_text(text)
    with pytest.raises(error, match=match) as info:
        load_model_defaults(tmp_path)
    assert METADATA_NAME in str(info.value)  # the message names the file


def test_from_pretrained_reads_the_metadata_and_refuses_a_malformed_file(model_with_defaults, tmp_path):
    editor = Editor.from_pretrained(model_with_defaults)
    assert editor.default_preset == "style"
    broken = tmp_path / "broken"
    shutil.copytree(model_with_defaults, broken)
    (broken / METADATA_NAME).write_text(json.dumps({"format": 1, "preset": "vivid"}))
    with pytest.raises(ConfigError, match="vivid"):
        Editor.from_pretrained(broken)


def test_precedence_explicit_preset_and_config_win(model_with_defaults, tiny_editor):
    editor = Editor.from_pretrained(model_with_defaults)
    assert editor.resolve_config(None, None, 6) == EditConfig.preset("style", 6)
    assert editor.resolve_config("nonstyle", None, 6) == EditConfig.preset("nonstyle", 6)
    explicit = EditConfig.preset("shapes", 6)
    assert editor.resolve_config(None, explicit, 6) == explicit
    # a folder without metadata keeps the old default
    assert tiny_editor.default_preset == "nonstyle"
    assert tiny_editor.resolve_config(None, None, 6) == EditConfig.preset("nonstyle", 6)


def test_server_uses_the_models_preset_unless_the_request_names_one(model_with_defaults):
    from gnr_fast.serving.service import EditService, ServiceConfig, encode_png

    editor = Editor.from_pretrained(model_with_defaults)
    service = EditService(editor, ServiceConfig(default_steps=4))
    try:
        png = encode_png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
        job = service.edit_job(png, "a red circle", "a green circle", preset=None)
        assert job.config == EditConfig.preset("style", 4)
        job = service.edit_job(png, "a red circle", "a green circle", preset="nonstyle")
        assert job.config == EditConfig.preset("nonstyle", 4)
    finally:
        service.close(timeout_s=30)


def test_cli_edit_without_preset_uses_the_bundled_models_preset(tmp_path, monkeypatch):
    from gnr_fast.cli import main

    import gnr_fast.requests

    resolved: list[EditConfig] = []
    original = gnr_fast.requests.resolve_config

    def spy(*args, **kwargs):  # the one place every edit request's config is resolved
        resolved.append(original(*args, **kwargs))
        return resolved[-1]

    monkeypatch.setattr(gnr_fast.requests, "resolve_config", spy)
    image = tmp_path / "in.png"
    Image.fromarray(generate_scene(9_000_001).image).save(image)
    scene = generate_scene(9_000_001)
    with pytest.warns(PromptGrammarWarning) as record:
        rc = main(["edit", str(image), "-s", scene.caption, "-t", "a cat wearing a hat", "--steps", "2",
                   "--quiet", "-o", str(tmp_path / "out.png")])
    assert rc == 0 and (tmp_path / "out.png").is_file()
    assert resolved and all(c == EditConfig.preset("shapes", 2) for c in resolved)
    # one warning, for the unreadable target; none for the grammar's source caption
    grammar_warnings = [w for w in record if issubclass(w.category, PromptGrammarWarning)]
    assert len(grammar_warnings) == 1
    message = str(grammar_warnings[0].message)
    assert "'a cat wearing a hat'" in message and "'a large red circle on a blue background'" in message


def test_grammar_warning_only_for_prompts_the_model_cannot_read():
    grammar = load_model_defaults(BUNDLED_MODEL).caption_grammar
    with pytest.warns(PromptGrammarWarning, match="write prompts like 'a large red circle") as record:
        assert warn_if_outside_grammar(grammar, "a photo of a cat", "target_prompt")
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert "target_prompt 'a photo of a cat'" in str(record[0].message)
    scene = generate_scene(9_000_002)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for form in CAPTION_FORMS:  # the grammar and every relaxed form are read
            assert not warn_if_outside_grammar(grammar, caption_in_form(scene.spec, form))
        assert not warn_if_outside_grammar(grammar, "")  # the unconditional prompt
        assert not warn_if_outside_grammar(None, "a photo of a cat")  # model without a grammar


def test_editor_warns_once_per_new_prompt(tiny_model_path):
    grammar = load_model_defaults(BUNDLED_MODEL).caption_grammar
    from gnr_fast.loading import load_components

    editor = Editor(load_components(tiny_model_path), defaults=ModelDefaults("shapes", grammar))
    with pytest.warns(PromptGrammarWarning):
        editor.embed("a photo of a cat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        editor.embed("a photo of a cat")  # cached: no second warning
        editor.embed("a red disc on blue")


def test_readme_quick_start_prompts_are_readable():
    from gnr_shapes.world.captions import parse_prompt

    readme = (BUNDLED_MODEL.parents[2] / "README.md").read_text()
    quoted = [q for q in _quoted_prompts(readme) if " on " in q or ", " in q]
    assert quoted, "README shows no example prompts"
    unreadable = [q for q in quoted if parse_prompt(q) is None]
    assert not unreadable, unreadable


def _quoted_prompts(text: str) -> list[str]:
    import re

    start = text.find("### Prompts for the bundled model")
    section = text[start:text.find("\n## ", start + 5)] if start >= 0 else ""
    return re.findall(r'-[st] "([^"]+)"', section)

