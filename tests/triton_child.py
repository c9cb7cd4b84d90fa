"""Running a kernel test file's Triton cases in a child process under ``TRITON_INTERPRET=1``.

``@triton.jit`` decides at triton's first import whether kernels are interpreted, so a test process
that imported triton in compiled mode cannot interpret; the kernel test files then rerun their
Triton cases in a fresh Python started with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

INTERPRETER_NOT_READY = "the Triton interpreter is not usable in this process"
REPO = Path(__file__).resolve().parents[1]


def run_interpreted_child(test_file: str, selection: str) -> None:
    """Run ``pytest test_file -k selection`` with ``TRITON_INTERPRET=1`` and assert that it passed
    something and that no case skipped for want of an interpreter."""
    command = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-rs", "-k", selection]
    child = subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                           timeout=600, check=False, cwd=REPO)
    report = child.stdout[-6000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    assert " passed" in child.stdout and INTERPRETER_NOT_READY not in child.stdout, report
