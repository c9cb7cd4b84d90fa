"""Fixtures of the kernel tests: the device the Triton kernels run on.

``@triton.jit`` decides at triton's first import whether kernels are built for the GPU or
interpreted (``TRITON_INTERPRET=1``, CPU tensors). ``tests/conftest.py`` sets the variable on a
machine without a CUDA GPU before any test module imports ``gnr_fast`` (which imports triton),
and ``.ci/run`` exports it, so the interpreted cases run in this process whatever the collection
order; a process where they cannot is a broken setup and fails rather than skips.
"""

from __future__ import annotations

import pytest
import torch

from gnr_fast.ops.triton_kernels import interpreter_ready, triton_importable, triton_interpreting


@pytest.fixture(params=["cpu", "cuda"])
def triton_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """'cpu' (interpreted kernels, in this process) or 'cuda' (compiled kernels; skips without a GPU)."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return "cuda"
    if torch.cuda.is_available():
        pytest.skip("interpreted kernels run on machines without a CUDA GPU (here triton builds GPU kernels)")
    assert triton_importable(), "triton is not installed, but the [test] extra pins it (pip install -e '.[test]')"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_interpreting() and interpreter_ready(), (
        "the Triton interpreter is not usable in this process: triton was imported before TRITON_INTERPRET=1 "
        "was set (tests/conftest.py sets it first on a machine without a CUDA GPU)"
    )
    return "cpu"
