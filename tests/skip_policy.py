"""The skip allow-list that ``GNR_FAST_STRICT_SKIPS=1`` (set by ``.ci/run``) enforces in tests/conftest.py.

Only hardware a CI host may lack can skip a test: a CUDA GPU, TensorRT (CUDA-only), an AVX-512 /
native bfloat16 CPU. Every other skip (missing data, a missing [test] package, a broken setup)
fails the run.
"""

from __future__ import annotations

import re

ALLOWED_SKIP_REASONS = (
    re.compile(r"\bCUDA (GPU|device)", re.IGNORECASE),
    re.compile(r"\btensorrt\b", re.IGNORECASE),
    re.compile(r"\bAVX-512\b|\bnative bf(loat)?16\b", re.IGNORECASE),
)


def skip_allowed(reason: str) -> bool:
    """True when ``reason`` matches one of ALLOWED_SKIP_REASONS."""
    return any(pattern.search(reason) for pattern in ALLOWED_SKIP_REASONS)
