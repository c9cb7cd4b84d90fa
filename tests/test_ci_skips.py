"""The skip allow-list (tests/skip_policy.py, enforced by tests/conftest.py): under
GNR_FAST_STRICT_SKIPS=1 (set by .ci/run) only skips for missing hardware pass; any other skip, in a
test or at collection, fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from skip_policy import skip_allowed

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("reason, allowed", [
    ("Skipped: needs a CUDA GPU", True),
    ("needs a CUDA device (none here)", True),
    ("tensorrt is not installed (pip install tensorrt-cu12, NVIDIA's index); no CUDA device", True),
    ("this CPU has no AVX-512 BF16 / AMX", True),
    ("golden data not found at /x", False),
    ("could not import 'onnx': No module named 'onnx'", False),
    ("the Triton interpreter is not usable in this process", False),
    ("native ops unavailable: not built", False),
])
def test_allow_list(reason, allowed):
    assert skip_allowed(reason) is allowed


def _run(folder: Path, strict: str) -> subprocess.CompletedProcess:
    """pytest on two generated test files under this folder's conftest.py hooks: one skips at collection,
    one has a pass, an allowed skip and a skip outside the list."""
    folder.mkdir(parents=True)
    (folder / "conftest.py").write_text(
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        f"spec = importlib.util.spec_from_file_location('gnr_tests_conftest', {str(TESTS / 'conftest.py')!r})\n"
        "shared = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(shared)\n"
        "pytest_collectreport, pytest_runtest_logreport = shared.pytest_collectreport, shared.pytest_runtest_logreport\n"
        "pytest_sessionfinish, pytest_terminal_summary = shared.pytest_sessionfinish, shared.pytest_terminal_summary\n")
    (folder / "test_collect.py").write_text('import pytest\npytest.importorskip("no_such_package_here")\n')
    (folder / "test_generated.py").write_text(BODY)
    env = {**os.environ, "GNR_FAST_STRICT_SKIPS": strict}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=folder, check=False)


BODY = '''import pytest

def test_passes():
    pass

def test_on_a_gpu():
    pytest.skip("needs a CUDA GPU")

def test_without_data():
    pytest.skip("data missing")
'''


def test_a_skip_outside_the_list_fails_only_in_strict_mode(tmp_path):
    strict = _run(tmp_path / "strict", "1")
    assert strict.returncode == 1, strict.stdout
    assert "test_without_data: Skipped: data missing" in strict.stdout, strict.stdout
    assert "test_collect.py: Skipped: could not import 'no_such_package_here'" in strict.stdout, strict.stdout
    assert "test_on_a_gpu:" not in strict.stdout
    assert _run(tmp_path / "lenient", "0").returncode == 0
