"""A model's second text encoder for the relaxed forms of its caption grammar (gnr_fast.json
``caption_grammar.relaxed_text_encoder``): which prompts it encodes, loading, errors, model id."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from gnr_fast import Editor
from gnr_fast.errors import ModelLoadError
from gnr_fast.loading import BUNDLED_MODEL, load_components
from gnr_fast.model_defaults import METADATA_NAME, load_model_defaults
from gnr_fast.prompts import PromptGrammarWarning, prompt_form

GRAMMAR = {
    "name": "shapes-world",
    "summary": "shapes on backgrounds",
    "grammar": "a <size> <colour> <shape> on a <background>",
    "examples": ["a large red circle on a blue background"],
}
RELAXED = "text_encoder_relaxed"
IN_GRAMMAR = "a large red circle on a blue background"
RELAXED_PROMPT = "a red circle on a blue background"


def _metadata(relaxed: str | None = RELAXED) -> str:
    grammar = dict(GRAMMAR, **({"relaxed_text_encoder": relaxed} if relaxed is not None else {}))
    return json.dumps({"format": 1, "preset": "shapes", "caption_grammar": grammar})


def _perturbed_copy(source, target, seed: int) -> None:
    """``source``'s text encoder saved to ``target`` with its last layer's weights moved."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(source, local_files_only=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer = encoder.get_parameter(next(n for n, _ in encoder.named_parameters() if n.endswith("mlp.fc2.weight")))
        layer.add_(0.5 * torch.randn(layer.shape, generator=gen))
    encoder.save_pretrained(target)


@pytest.fixture(scope="module")
def routed_model(tiny_model_path, tmp_path_factory):
    """The tiny pipeline with the shapes-world grammar and a second, different text encoder."""
    folder = tmp_path_factory.mktemp("tiny-routed") / "model"
    shutil.copytree(tiny_model_path, folder)
    _perturbed_copy(folder / "text_encoder", folder / RELAXED, seed=0)
    (folder / METADATA_NAME).write_text(_metadata())
    return folder


def _encode(encoder, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def test_prompt_forms_of_the_shapes_grammar():
    grammar = load_model_defaults(BUNDLED_MODEL).caption_grammar
    assert grammar is not None
    for prompt in (IN_GRAMMAR, "A  Large red circle on a blue background",
                   "a small green square and a large white triangle on a red to blue gradient background"):
        assert prompt_form(grammar, prompt) == "grammar", prompt
    for prompt in (RELAXED_PROMPT, IN_GRAMMAR + ".", "red circle, blue background", "a big red disc on blue"):
        assert prompt_form(grammar, prompt) == "relaxed", prompt
    assert prompt_form(grammar, "a photo of a cat") == "outside"
    assert prompt_form(grammar, "") is None and prompt_form(grammar, "  ") is None


def test_relaxed_prompts_use_the_second_encoder_and_everything_else_the_first(routed_model):
    editor = Editor.from_pretrained(routed_model)
    components = editor.components
    base, relaxed = components.text_encoder, components.relaxed_text_encoder
    assert relaxed is not None and relaxed is not base
    tokenizer = components.tokenizer
    for prompt in (IN_GRAMMAR, "", "a photo of a cat"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptGrammarWarning)
            got = editor.embed(prompt)
        assert torch.equal(got, _encode(base, tokenizer, prompt)), prompt
    got = editor.embed(RELAXED_PROMPT)
    assert torch.equal(got, _encode(relaxed, tokenizer, RELAXED_PROMPT))
    assert not torch.allclose(got, _encode(base, tokenizer, RELAXED_PROMPT), atol=1e-3)  # the encoders differ


def test_without_the_key_every_prompt_uses_the_one_encoder(routed_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(routed_model, folder)
    (folder / METADATA_NAME).write_text(_metadata(relaxed=None))
    editor = Editor.from_pretrained(folder)
    assert editor.components.relaxed_text_encoder is None
    expected = _encode(editor.components.text_encoder, editor.components.tokenizer, RELAXED_PROMPT)
    assert torch.equal(editor.embed(RELAXED_PROMPT), expected)


def test_relaxed_edit_runs_and_the_encoder_follows_the_dtype(routed_model):
    editor = Editor.from_pretrained(routed_model, dtype=torch.bfloat16)
    relaxed = editor.components.relaxed_text_encoder
    assert {p.dtype for p in relaxed.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in relaxed.parameters()) and not relaxed.training
    from PIL import Image

    result = editor.edit(Image.new("RGB", (64, 64), (200, 30, 30)), "a green circle on a blue background",
                         source_prompt=RELAXED_PROMPT, num_steps=2, progress=False)
    assert torch.isfinite(result.latents).all()


def test_model_id_covers_the_relaxed_encoder(routed_model, tiny_model_path, tmp_path):
    routed_id = load_components(routed_model).model_id
    assert routed_id != load_components(tiny_model_path).model_id
    other = tmp_path / "model"
    shutil.copytree(routed_model, other)
    shutil.rmtree(other / RELAXED)
    _perturbed_copy(routed_model / "text_encoder", other / RELAXED, seed=1)
    assert load_components(other).model_id != routed_id  # same main weights, another relaxed encoder
    assert load_components(routed_model).model_id == routed_id  # and the id is stable
    assert load_components(routed_model, dtype=torch.bfloat16).model_id == routed_id  # in every load dtype


@pytest.mark.parametrize(("name", "match"), [("../text_encoder", "no path separators"), (".", "no path separators"),
                                              ("", "non-empty string")])
def test_a_relaxed_encoder_outside_the_folder_is_refused(tmp_path, name, match):
    (tmp_path / METADATA_NAME).write_text(_metadata(relaxed=name))
    with pytest.raises(ModelLoadError, match=match):
        load_model_defaults(tmp_path)


def test_a_missing_relaxed_encoder_folder_is_a_clear_error(routed_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(routed_model, folder)
    shutil.rmtree(folder / RELAXED)
    with pytest.raises(ModelLoadError, match=r"text_encoder_relaxed.*does not hold config.json"):
        Editor.from_pretrained(folder)


def test_the_bundled_model_ships_its_relaxed_encoder():
    grammar = load_model_defaults(BUNDLED_MODEL).caption_grammar
    assert grammar is not None and grammar.relaxed_text_encoder == RELAXED
    components = load_components()
    assert components.relaxed_text_encoder is not None


def test_an_export_takes_the_model_defaults_without_the_relaxed_encoder(tmp_path):
    from gnr_shapes.training.export import copy_model_defaults

    copy_model_defaults(BUNDLED_MODEL, tmp_path)
    copied = load_model_defaults(tmp_path)
    bundled = load_model_defaults(BUNDLED_MODEL)
    assert copied.caption_grammar is not None and copied.caption_grammar.relaxed_text_encoder is None
    assert copied.preset == bundled.preset and copied.caption_grammar.examples == bundled.caption_grammar.examples
    with pytest.raises(FileNotFoundError, match="no gnr_fast.json"):
        copy_model_defaults(tmp_path / "missing", tmp_path)
