"""Benchmark plumbing: reference vs fast measured side by side in one run, tables printed at the end.

Timed cases use :func:`benchmarks.alternating.alternate` (warm-up, then ``--rounds`` rounds with the
variants alternated) and record each variant's :class:`~benchmarks.alternating.Samples`; the table
shows medians with the min–max of the rounds, and ratios of medians of the same run.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

from benchmarks.alternating import Samples

RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)
OUT = Path(__file__).parent / "results"


def pytest_addoption(parser):
    group = parser.getgroup("gnr-fast benchmarks")
    group.addoption("--rounds", type=int, default=3, help="timed rounds per variant, alternated (default 3)")
    group.addoption("--warmup", type=int, default=1, help="untimed warm-up calls per variant (default 1)")


@pytest.fixture(scope="session")
def rounds(request) -> int:
    return request.config.getoption("--rounds")


@pytest.fixture(scope="session")
def warmup(request) -> int:
    return request.config.getoption("--warmup")


@pytest.fixture
def record():
    """record(case, mode, samples=Samples | seconds=float, **extra): one variant's measurement for the tables."""

    def _record(case: str, mode: str, **values) -> None:
        RESULTS[case][mode] = values

    return _record


def mean_seconds(benchmark) -> float:
    return float(benchmark.stats.stats.mean)


def _cell(values: dict) -> str:
    samples = values.get("samples")
    if isinstance(samples, Samples):
        return samples.describe()
    seconds = values.get("seconds")
    return f"{seconds:.3f} s" if isinstance(seconds, (int, float)) else "-"


def _median(values: dict) -> float | None:
    samples = values.get("samples")
    if isinstance(samples, Samples):
        return samples.median
    seconds = values.get("seconds")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def table_rows() -> list[str]:
    """Markdown rows ``| case | reference | fast | ratio | extra |`` (ratio = median reference / median fast)."""
    rows = ["| case | reference | fast | ratio | extra |", "| --- | --- | --- | --- | --- |"]
    for case, modes in RESULTS.items():
        ref, fast = modes.get("reference", {}), modes.get("fast", {})
        rs, fs = _median(ref), _median(fast)
        ratio = f"{rs / fs:.2f}×" if rs and fs else "-"
        extra = {k: v for m in (ref, fast) for k, v in m.items() if k not in ("seconds", "samples")}
        extra_text = ", ".join(f"{k}={v}" for k, v in extra.items())
        rows.append(f"| {case} | {_cell(ref)} | {_cell(fast)} | {ratio} | {extra_text} |")
    return rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    rounds, warmup = config.getoption("--rounds"), config.getoption("--warmup")
    title = (f"gnr-fast benchmark (reference vs fast, one run; {warmup} warm-up + {rounds} alternated rounds; "
             "median (min–max); ratio of medians)")
    lines = ["", title, "", *table_rows()]
    for line in lines:
        terminalreporter.write_line(line)
    OUT.mkdir(exist_ok=True)
    serial = {
        case: {mode: {k: (v.seconds if isinstance(v, Samples) else v) for k, v in values.items()} for mode, values in modes.items()}
        for case, modes in RESULTS.items()
    }
    (OUT / "latest.json").write_text(json.dumps(
        {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds, "warmup": warmup, "results": serial},
        indent=2, default=str,
    ))
