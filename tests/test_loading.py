"""Model loading: success offline, and a clear error for every broken checkpoint."""

import json
import shutil

import pytest

from gnr_fast import Editor
from gnr_fast.errors import (
    MissingComponentError,
    ModelNotFoundError,
    NotAPipelineError,
    UnsupportedArchitectureError,
)


def test_loads_offline(tiny_model_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    editor = Editor.from_pretrained(tiny_model_path)
    assert editor.components.schedule.prediction_type == "epsilon"
    assert editor.components.tokenizer.model_max_length == 77
    assert len(editor.model_id) == 16


def test_model_id_changes_with_weights(tiny_model_path, tiny_vpred_model_path):
    assert Editor.from_pretrained(tiny_model_path).model_id != Editor.from_pretrained(tiny_vpred_model_path).model_id


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Editor.from_pretrained(tmp_path / "nope")


def test_file_is_not_a_pipeline(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(NotAPipelineError, match="no safetensors header"):
        Editor.from_pretrained(f)


def test_folder_without_index(tmp_path):
    with pytest.raises(NotAPipelineError, match="model_index.json"):
        Editor.from_pretrained(tmp_path)


def test_missing_component(tiny_model_path, tmp_path):
    broken = _copy(tiny_model_path, tmp_path / "m")
    shutil.rmtree(broken / "vae")
    with pytest.raises(MissingComponentError, match="'vae'"):
        Editor.from_pretrained(broken)


def test_missing_weights(tiny_model_path, tmp_path):
    broken = _copy(tiny_model_path, tmp_path / "m")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingComponentError, match="weights of 'unet'"):
        Editor.from_pretrained(broken)


def test_sdxl_rejected(tiny_model_path, tmp_path):
    xl = _copy(tiny_model_path, tmp_path / "xl")
    index = json.loads((xl / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (xl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedArchitectureError, match="SD 1.x"):
        Editor.from_pretrained(xl)


def test_sdxl_style_unet_rejected(tiny_model_path, tmp_path):
    m = _copy(tiny_model_path, tmp_path / "m")
    config = json.loads((m / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (m / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="addition_embed_type"):
        Editor.from_pretrained(m)
