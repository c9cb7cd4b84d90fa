"""Hub ids ('org/name') resolve from a hub-format cache laid out by the test, with no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gnr_fast import Editor
from gnr_fast.errors import ModelNotFoundError
from gnr_fast.hub import is_hub_id, resolve_model

TINY_SD = Path(__file__).resolve().parents[3] / "shared" / "golden" / "tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: Path, repo_id: str, model: Path) -> Path:
    """``model`` copied into ``cache`` as huggingface_hub lays a download out; the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """HF_HOME pointing at a fresh folder whose hub/ cache holds the golden tiny model as org/tiny-sd."""
    home = tmp_path / "hf-home"
    lay_out_hub_cache(home / "hub", "org/tiny-sd", TINY_SD)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # offline is forced whatever this says
    return home / "hub"


def test_hub_id_loads_the_cached_snapshot_like_its_folder(hub_cache):
    from_id = Editor.from_pretrained("org/tiny-sd")
    from_folder = Editor.from_pretrained(TINY_SD)
    assert from_id.components.path == hub_cache / "models--org--tiny-sd" / "snapshots" / COMMIT
    assert from_id.model_id == from_folder.model_id
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(from_id.components, name).state_dict(), getattr(from_folder.components, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_hf_hub_cache_wins_over_hf_home(tmp_path, monkeypatch):
    snapshot = lay_out_hub_cache(tmp_path / "cache", "org/tiny-sd", TINY_SD)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_model("org/tiny-sd") == snapshot


def test_missing_hub_id_says_where_it_looked_and_how_to_fetch(hub_cache):
    with pytest.raises(ModelNotFoundError) as info:
        Editor.from_pretrained("org/not-downloaded")
    message = str(info.value)
    assert str(hub_cache / "models--org--not-downloaded") in message
    assert "hf download org/not-downloaded" in message and "HF_HUB_CACHE" in message


def test_local_paths_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not is_hub_id("org/model")  # an existing local folder wins
    assert is_hub_id("org/other")
    assert not is_hub_id("./org/other") and not is_hub_id("../x") and not is_hub_id("a/b/c")
    assert not is_hub_id(Path("org/other"))  # a Path is always a path
