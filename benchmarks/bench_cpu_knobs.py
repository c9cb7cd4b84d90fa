"""CPU speed knobs that keep the numbers (issue 3): channels-last and glibc allocator settings.

Each variant runs in a fresh process (allocator variables only act at process start), side by
side in one run: ``python -m pytest benchmarks/bench_cpu_knobs.py -s``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
VARIANTS = {
    "default": ({}, []),
    "allocator": (ALLOCATOR, []),
    "channels-last": ({}, ["--channels-last"]),
    "allocator+channels-last": (ALLOCATOR, ["--channels-last"]),
}


def _time(model: str, env: dict, flags: list[str]) -> float:
    cmd = [sys.executable, "-m", "benchmarks.unet_timing", "--model", model, *flags]
    out = subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["min_s"]


@pytest.mark.parametrize("model", ["golden", "sd15"])
def test_cpu_knobs(model, record):
    if model == "golden" and not (ROOT.parent / "shared" / "golden" / "tiny-sd").is_dir():
        pytest.skip("golden model not found")
    base = _time(model, *VARIANTS["default"])
    for name, (env, flags) in VARIANTS.items():
        seconds = base if name == "default" else _time(model, env, flags)
        # "reference" column = the default process, "fast" column = the variant: ratio = speed-up
        record(f"{model}: UNet fwd b=2, {name}", "reference", seconds=base)
        record(f"{model}: UNet fwd b=2, {name}", "fast", seconds=seconds)
