"""Shared fixtures: the tiny random pipeline, golden data location, thread settings; TRITON_INTERPRET
on a machine without a GPU; the skip allow-list that ``GNR_FAST_STRICT_SKIPS=1`` (set by ``.ci/run``)
enforces."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Before any test module imports gnr_fast (which imports triton): @triton.jit picks interpreted or GPU
    # kernels at triton's first import, and the kernel tests interpret on CPU (tests/kernels/conftest.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from skip_policy import skip_allowed  # noqa: E402
from tiny_pipeline import build_tiny_pipeline  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A random-weight SD 1.x pipeline folder (ε-prediction)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_vpred_model_path(tmp_path_factory) -> Path:
    """A random-weight SD 2.x-style pipeline folder (v-prediction)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-v"), seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for the requesting module, restored after it.

    For modules whose results must not depend on the machine's core count (the parity tests: the
    reduction split of a multi-threaded conv or matmul changes the rounding, and a chaotic edit
    amplifies it) or whose tensors are so small that an OpenMP barrier costs more than the work.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """Torch's intra-op thread count restored after a test that sets its own (one_torch_thread's
    function-scoped counterpart: the test picks the counts)."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_editor(tiny_model_path):
    from gnr_fast import Editor

    return Editor.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden data folder; its absence fails the requesting tests (a CI machine must have it)."""
    if not (GOLDEN / "nonstyle_scene0" / "golden.pt").is_file():
        pytest.fail(f"golden data not found at {GOLDEN} (it lives in the shared/ folder beside the checkout)")
    return GOLDEN


@pytest.fixture
def sample_image():
    """A 64×64 RGB test image: a red disc on a blue background."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:64, :64]
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[...] = (30, 60, 200)
    rgb[(yy - 32) ** 2 + (xx - 30) ** 2 < 15**2] = (220, 30, 30)
    return Image.fromarray(rgb)


# --- the skip allow-list (GNR_FAST_STRICT_SKIPS=1, as .ci/run sets; the list: tests/skip_policy.py) -----------
_disallowed_skips: list[str] = []


def _strict_skips() -> bool:
    return os.environ.get("GNR_FAST_STRICT_SKIPS") == "1"


def _record_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (_strict_skips() and report.skipped) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if not skip_allowed(reason):
        _disallowed_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _disallowed_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _disallowed_skips:
        terminalreporter.section("skips outside the allow-list (GNR_FAST_STRICT_SKIPS=1)", red=True)
        for line in _disallowed_skips:
            terminalreporter.line(line)
