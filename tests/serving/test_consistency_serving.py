"""`gnr-fast serve --model <consistency folder>`: the edit service on a consistency model goes through
the same Editor path (session, executors, edit_batch, source cache) as a DDIM model (issue 34 item 3)."""

from __future__ import annotations

import argparse

import pytest
import torch

from gnr_fast import ConfigError
from gnr_fast.cli import _editor
from gnr_fast.samplers import ConsistencySampler
from gnr_fast.serving.service import EditService, ServiceConfig
from tests.consistency_model import consistency_model_dir

SRC = "a red circle on a blue background"
TRG = "a green circle on a blue background"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def editor(golden_dir, tmp_path_factory):
    """The editor `gnr-fast serve --model DIR` builds (its model arguments, defaults otherwise)."""
    folder = consistency_model_dir(golden_dir, tmp_path_factory.mktemp("icd"))
    args = argparse.Namespace(model=str(folder), device="cpu", dtype="auto", max_pixels=None, runtime="eager",
                              prediction_type=None, model_config=None)
    return _editor(args)


@pytest.fixture
def service(editor):
    svc = EditService(editor, ServiceConfig(max_batch=2, default_steps=50, max_steps=50))  # serve's --steps 50
    yield svc
    svc.close(timeout_s=30)


def test_service_edits_a_consistency_model_and_reuses_its_inversion(service, editor, golden_dir):
    scene = golden_dir / "consistency_scene0"
    golden = torch.load(scene / "golden.pt", weights_only=True)
    image = (scene / "input.png").read_bytes()
    assert isinstance(editor.fixed_sampler, ConsistencySampler)
    (first,) = service.run([service.edit_job(image, SRC, TRG)])  # no steps named: the model's 4, not the server's 50
    assert not first.cache_hit and first.result.config.num_steps == 4 and first.inversion.num_steps == 4
    assert rel(first.result.latents, golden["latents"][4]) <= 5e-4  # measured 2.5e-5 (the parity test's edit)
    assert first.result.unet_rows == 11  # step 0: source + target rows; steps 1-3: source + 2 grad rows
    (second,) = service.run([service.edit_job(image, SRC, TRG)])
    assert second.cache_hit and second.result.unet_rows == 7  # the source passes come from the cache
    assert torch.equal(second.result.latents, first.result.latents)


def test_service_refuses_what_the_consistency_model_cannot_run(service, golden_dir):
    image = (golden_dir / "consistency_scene0" / "input.png").read_bytes()
    with pytest.raises(ConfigError, match="'style' is a DDIM preset"):
        service.edit_job(image, SRC, TRG, preset="style")
    with pytest.raises(ConfigError, match="4 steps"):
        service.edit_job(image, SRC, TRG, steps=10)
