"""Benchmark plumbing: ratios of reference vs fast measured in the same run, printed at the end."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)
OUT = Path(__file__).parent / "results"


@pytest.fixture
def record():
    """record(case, mode, seconds=..., **extra): store one measurement for the ratio table."""

    def _record(case: str, mode: str, **values) -> None:
        RESULTS[case][mode] = values

    return _record


def mean_seconds(benchmark) -> float:
    return float(benchmark.stats.stats.mean)


def _seconds(value: object) -> str:
    return f"{value:.3f}s" if isinstance(value, (int, float)) else "-"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    lines = ["", "gnr-fast benchmark ratios (reference / fast, same run)", ""]
    header = f"{'case':<38} {'reference':>12} {'fast':>12} {'ratio':>8}  extra"
    lines.append(header)
    for case, modes in RESULTS.items():
        ref, fast = modes.get("reference", {}), modes.get("fast", {})
        rs, fs = ref.get("seconds"), fast.get("seconds")
        ratio = f"{rs / fs:.2f}x" if rs and fs else "-"
        extra = {k: v for m in (ref, fast) for k, v in m.items() if k != "seconds"}
        lines.append(f"{case:<38} {_seconds(rs):>12} {_seconds(fs):>12} {ratio:>8}  {extra if extra else ''}")
    for line in lines:
        terminalreporter.write_line(line)
    OUT.mkdir(exist_ok=True)
    (OUT / "latest.json").write_text(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": RESULTS}, indent=2, default=str))
