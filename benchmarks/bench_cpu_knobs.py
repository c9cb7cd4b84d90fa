"""CPU speed knobs that keep the numbers (issue 3): channels-last and glibc allocator settings.

Allocator variables only act at process start, so every sample is a fresh process
(``benchmarks.unet_timing``: one untimed warm-up forward, then ``--repeats`` timed ones; the
sample is their minimum). The variants are alternated — round r runs them in order, the next
round in reverse — for ``--rounds`` rounds, and each variant's ratio is median(default) /
median(variant) of the same run. The table printed at the end has the README's columns:

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_cpu_knobs.py -s --rounds 3
    python -m pytest benchmarks/bench_cpu_knobs.py -s -k tiny --rounds 1    # smoke run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.alternating import Samples

ROOT = Path(__file__).resolve().parents[1]
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
VARIANTS = {
    "default": ({}, []),
    "allocator": (ALLOCATOR, []),
    "channels-last": ({}, ["--channels-last"]),
    "allocator+channels-last": (ALLOCATOR, ["--channels-last"]),
}
MODEL_NAMES = {"golden": "golden tiny", "sd15": "SD 1.5 architecture", "tiny": "test pipeline (smoke)"}
TABLE: dict[str, dict[str, Samples]] = {}


def _time(model: str, env: dict, flags: list[str]) -> float:
    cmd = [sys.executable, "-m", "benchmarks.unet_timing", "--model", model, *flags]
    out = subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["min_s"]


def measure(model: str, rounds: int) -> dict[str, Samples]:
    """``rounds`` fresh-process samples of every variant, alternated (A B C D, D C B A, …)."""
    names = list(VARIANTS)
    samples = {name: Samples() for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            env, flags = VARIANTS[name]
            samples[name].seconds.append(_time(model, env, flags))
    return samples


def markdown_row(model: str, samples: dict[str, Samples]) -> str:
    """``| model | default | allocator (ratio) | channels-last (ratio) | both (ratio) |``, medians (min–max)."""
    base = samples["default"]
    cells = [base.describe()]
    for name in list(VARIANTS)[1:]:
        cells.append(f"{samples[name].describe()}, {base.median / samples[name].median:.2f}×")
    return f"| {MODEL_NAMES[model]} | " + " | ".join(cells) + " |"


@pytest.mark.parametrize("model", ["golden", "sd15", "tiny"])
def test_cpu_knobs(model, record, rounds):
    if model == "golden" and not (ROOT.parent / "shared" / "golden" / "tiny-sd").is_dir():
        pytest.skip("golden model not found")
    samples = measure(model, rounds)
    TABLE[model] = samples
    for name in list(VARIANTS)[1:]:
        # "reference" column = the default process, "fast" column = the variant: ratio = speed-up
        record(f"{model}: UNet fwd b=2, {name}", "reference", samples=samples["default"])
        record(f"{model}: UNet fwd b=2, {name}", "fast", samples=samples[name])
    print()
    print("| model | default | `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000` | channels-last | both |")
    print("| --- | --- | --- | --- | --- |")
    for name, table in TABLE.items():
        print(markdown_row(name, table))
