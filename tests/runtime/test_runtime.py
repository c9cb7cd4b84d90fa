"""RuntimeConfig, the backend registry, and plans whose plain and capturing backends differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gnr_fast import BackendUnavailableError, ConfigError, Editor
from parity import rel_err
from gnr_fast.runtime import (
    BACKENDS,
    BackendSpec,
    CallKind,
    EagerPlainRunner,
    RuntimeConfig,
    inductor_unavailable_reason,
)
from gnr_fast.runtime import compiled as compiled_module

STEPS = 4


def test_presets_and_validation():
    assert RuntimeConfig.preset("eager") == RuntimeConfig() and not RuntimeConfig().split_source
    compiled = RuntimeConfig.preset("compiled")
    assert (compiled.plain, compiled.capturing) == ("compiled", "compiled")
    assert RuntimeConfig.resolve(None) == RuntimeConfig() and RuntimeConfig.resolve(compiled) is compiled
    assert RuntimeConfig(plain="onnx", capturing="eager").split_source
    with pytest.raises(BackendUnavailableError, match="runtime 'turbo' is unknown"):
        RuntimeConfig.resolve("turbo")
    with pytest.raises(ConfigError, match="compile_mode"):
        RuntimeConfig(compile_mode="fastest")
    with pytest.raises(ConfigError, match="recompile_limit"):
        RuntimeConfig(recompile_limit=0)
    with pytest.raises(ConfigError, match="compiler"):
        RuntimeConfig(compiler="tvm")
    with pytest.raises(ConfigError, match="plain"):
        RuntimeConfig(plain="")
    with pytest.raises(ConfigError, match="guard_modules must be True or False"):
        RuntimeConfig(guard_modules="no")
    with pytest.raises(AttributeError):
        compiled.plain = "eager"


def test_unknown_backend_is_unavailable():
    """RuntimeConfig validates its names against the registry: unknown, or not serving the kind."""
    with pytest.raises(BackendUnavailableError, match=r"plain backend 'nosuch' is unknown; choose one of \['eager'"):
        RuntimeConfig(plain="nosuch")
    with pytest.raises(BackendUnavailableError, match="capturing backend 'tensorrt' is not offered: 'tensorrt' serves plain"):
        RuntimeConfig(capturing="tensorrt")
    assert RuntimeConfig.preset("tensorrt") == RuntimeConfig("tensorrt", "eager")  # every plain backend is a preset


def test_inductor_without_a_cpp_compiler_is_unavailable(tiny_model_path, monkeypatch):
    assert inductor_unavailable_reason("cpu") is None  # this machine has g++
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in inductor_unavailable_reason("cpu")
    with pytest.raises(BackendUnavailableError, match="no C.. compiler found.*runtime='eager'"):
        Editor.from_pretrained(tiny_model_path, runtime="compiled")


@pytest.fixture
def split_backend(monkeypatch):
    """A second plain backend name (the eager runner registered again), so plain and capturing differ."""
    monkeypatch.setitem(BACKENDS, "eager-too", BackendSpec("eager-too", "eager again", plain=EagerPlainRunner))
    return RuntimeConfig(plain="eager-too", capturing="eager")


def test_split_source_edit_equals_the_shared_call_edit(tiny_model_path, split_backend):
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    shared = Editor.from_pretrained(tiny_model_path)
    split = Editor.from_pretrained(tiny_model_path, runtime=split_backend)
    assert split.runner.split_source and not shared.runner.split_source
    a = shared.edit(image, "a green square", source_prompt="a red circle", num_steps=STEPS, progress=False)
    b = split.edit(image, "a green square", source_prompt="a red circle", num_steps=STEPS, progress=False)
    assert rel_err(b.latents, a.latents) < 1e-5  # measured 8.3e-7 (2026-12-07, 2 threads): batch-size rounding only
    guided = sum(1 for i in range(1, STEPS) if a.config.guiders[1].is_active(i))
    assert b.unet_rows == a.unet_rows and b.unet_calls == a.unet_calls + guided  # the source row's own call
    kinds = split.runner.calls_by_kind
    assert kinds[CallKind.CAPTURING] == guided and kinds[CallKind.GRAD] == guided
    assert kinds[CallKind.PLAIN] == STEPS + STEPS  # inversion + every step's (ε_u, ε_trg)
    assert shared.runner.calls_by_kind[CallKind.CAPTURING] == guided


def test_counting_lives_in_the_executor(tiny_editor):
    run = tiny_editor.runner
    calls, rows = run.calls, run.rows
    z = torch.zeros(2, 4, 8, 8)
    with torch.no_grad():
        out = run.plain(z, torch.tensor(10), tiny_editor.embed(""))
    assert out.shape == z.shape and out.dtype == torch.float32
    assert (run.calls - calls, run.rows - rows) == (1, 2)


@pytest.mark.parametrize("argv", [
    ["edit", "in.png", "-s", "a", "-t", "b"], ["invert", "in.png", "-s", "a", "-o", "x.inv"], ["demo"], ["serve"]])
def test_cli_takes_a_runtime_on_every_model_command(argv):
    from gnr_fast.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(argv).runtime == "eager"
    assert parser.parse_args([*argv, "--runtime", "compiled"]).runtime == "compiled"
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--runtime", "turbo"])
