"""The CUDA kernels (csrc/cuda/) compile with nvcc. No GPU here, so this is a compile-only check;
they run only on GPU hosts (with a CUDA torch, CMakeLists.txt registers them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_cuda_sources_compile_with_nvcc():
    """.ci/check_cuda_sources compiles every csrc/cuda/*.cu for sm_90 with warnings as errors."""
    child = subprocess.run(
        [str(ROOT / ".ci" / "check_cuda_sources"), "90"], cwd=ROOT, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "NVCC": NVCC, "REQUIRE_NVCC": "1"}, timeout=600, check=False,
    )
    assert child.returncode == 0, child.stdout + child.stderr
    assert "attn_map_energy.cu compiles for sm_90" in child.stdout
