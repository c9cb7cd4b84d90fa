"""``gnr-fast doctor``: every backend and kernel gets a line with its availability and a reason."""

from __future__ import annotations

import json

import pytest

from gnr_fast import doctor
from gnr_fast.cli import main
from gnr_fast.ops import native

NAMES = ["platform", "eager", "compiled", "onnx", "tensorrt", "native CPU ops", "triton", "xformers", "cuda"]


def test_doctor_lists_every_backend_and_kernel(capsys):
    assert main(["doctor", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in checks] == NAMES
    by_name = {c["name"]: c for c in checks}
    assert by_name["eager"]["available"] is True
    assert all(c["detail"] for c in checks)  # a version when available, a reason when not
    # Native CPU ops: the line agrees with the loader's own predicate.
    assert by_name["native CPU ops"]["available"] == (native.native_unavailable_reason() is None)


def test_doctor_text_report_is_one_line_per_check(capsys):
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(NAMES)
    assert all((" yes " in line) ^ (" no " in line) for line in lines)


def test_missing_pieces_give_reasons(monkeypatch, tmp_path):
    """No C++ compiler, no native library, no onnxruntime: each check says so and what to do."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv(native.LIBRARY_ENV, str(tmp_path / "missing.so"))
    real_find = doctor.importlib.util.find_spec
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find(name, *a))
    runtime = {c.name: c for c in doctor.runtime_checks()}
    compiled, native_cpu, onnx = runtime["compiled"], doctor.check_native_cpu(), runtime["onnx"]
    assert not compiled.available and "C++ compiler" in compiled.detail
    assert not native_cpu.available and "missing.so" in native_cpu.detail and "pure-torch" in native_cpu.detail
    assert not onnx.available and "gnr-fast[export]" in onnx.detail


@pytest.mark.parametrize("check", doctor.CHECKS, ids=lambda c: c.__name__)
def test_each_check_returns_a_typed_line(check):
    result = check()
    assert isinstance(result, doctor.Check) and isinstance(result.available, bool) and result.detail
