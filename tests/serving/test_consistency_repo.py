"""`gnr-fast export triton-repo --sampler consistency`: a Triton repository that serves the bundled
model's 4-step consistency edit, its ONNX variant holding both fused UNets (reverse and forward).

The repository's Python-backend model is driven in process (Triton's ``initialize`` arguments, the
service its ``execute`` calls); the tritonserver round trip of a repository is
tests/serving/test_triton_repo.py's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gnr_fast import ConfigError, Editor
from gnr_fast.cli import build_parser, main
from gnr_fast.demo import DEMO_SOURCE, DEMO_TARGET, EXAMPLE_IMAGE
from gnr_fast.fingerprint import unet_fingerprint
from gnr_fast.runtime.export_info import ExportInfo
from gnr_fast.serving.protocol import EDIT_MODEL
from gnr_fast.serving.triton_repo import (
    ONNX_CACHE_FOLDER,
    ONNX_FOLDER,
    ONNX_FORWARD_FOLDER,
    RepoConfig,
    TritonPythonModel,
)

MAX_LEVELS = 2  # served ONNX edit vs local eager edit of the demo image: measured max 1 level, mean < 1e-4 (2026-12-07, Intel Xeon)
MEAN_LEVELS = 0.004  # 20x the mean measured on a drawn disc (2e-4); the demo image measured < 1e-4


def _initialize(repo) -> TritonPythonModel:
    """The instance Triton would start: ``initialize`` with the repository's parameters."""
    text = (repo / EDIT_MODEL / "config.pbtxt").read_text()
    params = {}
    for line in text.splitlines():
        if "key:" in line:
            key = json.loads(line.split("key: ")[1].split(" value:")[0])
            value = json.loads(line.split("string_value: ")[1].rsplit(" }", 2)[0])
            params[key] = {"string_value": value}
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps({"max_batch_size": 2, "parameters": params}),
                      "model_repository": str(repo / EDIT_MODEL), "model_version": "1", "model_instance_kind": "CPU"})
    return model


def test_repo_config_refuses_an_unknown_sampler():
    with pytest.raises(ConfigError, match="sampler must be one of"):
        RepoConfig(sampler="euler")


def test_serve_and_triton_repo_take_the_sampler():
    parser = build_parser()
    assert parser.parse_args(["serve", "--sampler", "consistency"]).sampler == "consistency"
    assert parser.parse_args(["export", "triton-repo", "--out", "x", "--sampler", "consistency"]).sampler == "consistency"


def test_onnx_repository_of_the_consistency_model(tmp_path):
    repo = tmp_path / "repo"
    assert main(["export", "triton-repo", "--out", str(repo), "--sampler", "consistency", "--runtime", "onnx",
                 "--max-batch", "1", "--torch-threads", "1"]) == 0
    assert 'key: "sampler" value: { string_value: "consistency" }' in (repo / EDIT_MODEL / "config.pbtxt").read_text()

    local = Editor.from_pretrained(sampler="consistency")
    version = repo / EDIT_MODEL / "1"
    # both UNets the editor runs, each under its own fingerprint (LoRAs fused as the editor fuses them)
    assert ExportInfo.read(version / ONNX_FOLDER).unet_id == unet_fingerprint(local.components.unet)
    assert ExportInfo.read(version / ONNX_FORWARD_FOLDER).unet_id == unet_fingerprint(local.inversion_unet)
    assert unet_fingerprint(local.components.unet) != unet_fingerprint(local.inversion_unet)

    model = _initialize(repo)
    service = model.service
    try:
        assert service.default_steps == 4
        job = service.edit_job(EXAMPLE_IMAGE.read_bytes(), DEMO_SOURCE, DEMO_TARGET)  # the demo's edit
        (outcome,) = service.run([job])
        assert outcome.result.config.num_steps == 4 and outcome.inversion.num_steps == 4
        expected = local.edit(Image.open(EXAMPLE_IMAGE), DEMO_TARGET, source_prompt=DEMO_SOURCE, progress=False)
        diff = np.abs(np.asarray(outcome.result.image, np.int16) - np.asarray(expected.image, np.int16))
        print(f"served onnx vs local eager: max {diff.max()} mean {diff.mean():.4f} levels")
        assert diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS
        # the repository's exports served every plain call: nothing was exported lazily
        assert not any((version / ONNX_CACHE_FOLDER).glob("**/export.json"))
    finally:
        model.finalize()
        service.close(timeout_s=30)
