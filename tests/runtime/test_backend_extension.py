"""Adding a runtime backend needs no edit of the package: a plain backend defined only in this file,
registered once, is chosen by ``RuntimeConfig`` (and its preset), by the CLI's ``--runtime`` and
listed by ``gnr-fast doctor`` — each reading the one registry (gnr_fast/runtime/registry.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gnr_fast import BackendUnavailableError, ConfigError, Editor
from gnr_fast.cli import build_parser, main
from parity import rel_err
from gnr_fast.runtime import (
    BACKENDS,
    BackendOption,
    BackendSpec,
    CallKind,
    EagerPlainRunner,
    RuntimeConfig,
    register_backend,
)
from gnr_fast.runtime.options import positive_int

STEPS = 4
CALL_ROWS: list[int] = []  # the batch size of every call the test backend ran


class NotingPlainRunner:
    """The test backend's plain runner: eager PyTorch, noting each call's rows in CALL_ROWS."""

    name = "noting"

    def __init__(self, unet: torch.nn.Module, config: RuntimeConfig) -> None:
        self.inner = EagerPlainRunner(unet, config)

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        CALL_ROWS.append(latents.shape[0])
        return self.inner(latents, timestep, context)


def needs_a_flux_capacitor(device: torch.device, config: RuntimeConfig) -> str | None:
    return "no flux capacitor on this host (pip install flux-capacitor)"


@pytest.fixture
def noting_backend():
    CALL_ROWS.clear()
    spec = register_backend(BackendSpec("noting", "eager calls noted by a test", plain=NotingPlainRunner,
                                        detail=lambda: "noting eager calls"))
    yield spec
    del BACKENDS["noting"]


@pytest.fixture
def unavailable_backend():
    spec = register_backend(BackendSpec("flux", "needs what no host has", plain=NotingPlainRunner,
                                        unavailable_reason=needs_a_flux_capacitor))
    yield spec
    del BACKENDS["flux"]


def test_runtime_config_chooses_the_registered_backend(noting_backend, tiny_model_path, tiny_editor, sample_image):
    assert RuntimeConfig.preset("noting") == RuntimeConfig("noting", "eager")  # plain only: capturing eager
    editor = Editor.from_pretrained(tiny_model_path, runtime="noting")
    results = [e.edit(sample_image, "a green square", source_prompt="a red circle", num_steps=STEPS, progress=False)
               for e in (editor, tiny_editor)]
    executor = editor.runner
    assert isinstance(executor.plain_runner, NotingPlainRunner)
    # Every plain call went to the new backend, and the executor counted each of them.
    assert len(CALL_ROWS) == executor.calls_by_kind[CallKind.PLAIN] > 0
    assert sum(CALL_ROWS) == executor.rows_by_kind[CallKind.PLAIN]
    assert rel_err(results[0].latents, results[1].latents) < 1e-5  # the source row's own call: batch rounding only


def test_cli_runtime_takes_the_registered_backend(noting_backend, tiny_model_path, sample_image, tmp_path):
    image = tmp_path / "in.png"
    sample_image.save(image)
    code = main(["invert", str(image), "-s", "a red circle", "-o", str(tmp_path / "in.inv"), "--model",
                 str(tiny_model_path), "--steps", str(STEPS), "--quiet", "--runtime", "noting"])
    assert code == 0
    assert CALL_ROWS == [1] * STEPS  # the inversion's plain calls, one row each, on the new backend


def test_cli_refuses_a_backend_nobody_registered():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["invert", "in.png", "-s", "a", "-o", "x.inv", "--runtime", "noting"])


def test_doctor_lists_registered_backends(noting_backend, unavailable_backend, capsys):
    assert main(["doctor", "--json"]) == 0
    lines = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert lines["noting"] == {"kind": "runtime", "name": "noting", "available": True, "detail": "noting eager calls"}
    assert lines["flux"]["available"] is False and "flux capacitor" in lines["flux"]["detail"]


def test_a_backend_declares_its_own_options(monkeypatch):
    """An option declared on a test backend's spec is a RuntimeConfig keyword and attribute, checked by
    its own check; an option no backend declares, or one declared twice, is refused."""
    monkeypatch.setitem(BACKENDS, "knobs", BackendSpec("knobs", "reads a knob", plain=NotingPlainRunner,
                                                       options=(BackendOption("knob", 1, "a test knob", positive_int),)))
    config = RuntimeConfig(plain="knobs", knob=3)
    assert config.knob == 3 == config.option("knobs", "knob") and config.backend_options("knobs") == {"knob": 3}
    assert RuntimeConfig(plain="knobs").knob == 1 and RuntimeConfig(knob=1) == RuntimeConfig()  # the default
    assert dataclasses.replace(config, knob=5).knob == 5 and dataclasses.replace(config, plain="eager").knob == 3
    with pytest.raises(ConfigError, match="RuntimeConfig.knob must be a positive integer, got 0"):
        RuntimeConfig(plain="knobs", knob=0)
    with pytest.raises(ConfigError, match="RuntimeConfig has no option 'dial': no registered backend declares it"):
        RuntimeConfig(plain="knobs", dial=2)
    with pytest.raises(ConfigError, match="option 'knob' is already backend 'knobs'"):
        register_backend(BackendSpec("knobs2", "the same knob", plain=NotingPlainRunner,
                                     options=(BackendOption("knob", 2, "again"),)))


def test_doctor_and_help_list_backend_options(monkeypatch, capsys):
    monkeypatch.setitem(BACKENDS, "knobs", BackendSpec("knobs", "reads a knob", plain=NotingPlainRunner,
                                                       options=(BackendOption("knob", 1, "a test knob", positive_int),)))
    assert main(["doctor", "--json"]) == 0
    lines = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert lines["knobs"] == {"kind": "runtime", "name": "knobs", "available": True,
                              "detail": "reads a knob; options: knob=1"}
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    assert "knobs: reads a knob (RuntimeConfig options: knob: a test knob)" in " ".join(capsys.readouterr().out.split())


def test_an_unavailable_backend_names_its_reason(unavailable_backend, tiny_model_path):
    with pytest.raises(BackendUnavailableError, match="'flux' runtime is unavailable: no flux capacitor"):
        Editor.from_pretrained(tiny_model_path, runtime="flux")
