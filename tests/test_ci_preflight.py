""".ci/preflight.py, which .ci/run and .ci/run-slow run before the tests: it passes on this machine
(every [test] pin installed, the golden data present, the bundled tritonserver starts) and names each
condition that would otherwise turn a suite into skips or into failures far from their cause."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

from gnr_fast.serving import launcher

PREFLIGHT = Path(__file__).resolve().parents[1] / ".ci" / "preflight.py"


def _preflight():
    spec = importlib.util.spec_from_file_location("ci_preflight", PREFLIGHT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preflight_passes_here():
    assert _preflight().problems() == []


def test_a_missing_test_package_is_named(monkeypatch):
    preflight = _preflight()
    real_version = preflight.version

    def version(name: str) -> str:
        if name == "nvidia-pytriton":
            raise preflight.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(preflight, "version", version)
    assert preflight.problems() == ["nvidia-pytriton==0.7.0 (from the [test] extra) is not installed"]


def test_a_static_python_is_named(monkeypatch):
    monkeypatch.setattr(launcher, "interpreter_libdir", lambda: None)
    assert "has no shared libpython" in " ".join(_preflight().server_problems())


def test_a_tritonserver_that_cannot_start_is_named(monkeypatch):
    real_run = subprocess.run
    broken = "error while loading shared libraries: libdcgm.so.3: cannot open shared object file"
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 127, "", broken)
                        if argv[0].endswith("tritonserver") else real_run(argv, **kw))
    assert any("libdcgm.so.3" in line for line in _preflight().server_problems())
