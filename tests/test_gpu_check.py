"""benchmarks/gpu_check.sh without a GPU: its dry run (arguments parsed, every step listed) and the
summary it writes from a run's files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu_check_report, gpu_edit_latency  # noqa: F401 (the latency script must import)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


def test_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu"
    result = run_script("--dry-run", "--out", str(out), "--steps", "7")
    assert result.returncode == 0, result.stderr
    listed = [line.split(" ", 1)[0].rstrip(":") for line in result.stdout.splitlines()]
    assert listed == ["env", "kernels", "native", "precision", "latency", "report"], result.stdout
    assert "--steps 7" in result.stdout and f"--out {out}/precision" in result.stdout
    assert "-k cuda" in result.stdout and "gpu_edit_latency.py --size 512" in result.stdout
    assert not out.exists()


def test_wheels_run_the_machines_python_from_source(tmp_path):
    """--wheels (a machine without a package index): the wheels go to a folder on PYTHONPATH with pip's
    --no-index, every step runs the machine's python3, and nothing creates a .venv."""
    (tmp_path / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    result = run_script("--dry-run", "--wheels", str(tmp_path), "--out", str(tmp_path / "gpu"))
    assert result.returncode == 0, result.stderr
    env, *rest = [line for line in result.stdout.splitlines() if "(limit" in line]
    assert "--no-index --no-deps" in env and f"{tmp_path}/*.whl" in env and "benchmarks/gpu_env.py" in env
    assert all(": python3 " in line for line in rest), rest
    assert ".venv" not in result.stdout and "machine's python3" in result.stderr


@pytest.mark.parametrize("args, message", [
    (("--bogus",), "unknown argument"), (("--steps", "0"), "positive integer"), (("--wheels", "."), "no .whl files")])
def test_bad_arguments_are_refused(args, message):
    result = run_script("--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr


def test_summary_from_a_runs_files(tmp_path):
    (tmp_path / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 570.1, 81559 MiB\n")
    (tmp_path / "env.txt").write_text("python: 3.12.3\ntorch: 2.11.0+cu130\ntriton: 3.6.0\ndevice: NVIDIA H100\n")
    (tmp_path / "steps.tsv").write_text("venv\t0\t95\nkernels\t1\t40\nnative\tnot wired\t0\n")
    (tmp_path / "kernels.xml").write_text(
        '<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/></testsuites>')
    (tmp_path / "latency.json").write_text(json.dumps({
        "dtype": "float16", "size": 512, "steps": 25, "rounds": 2, "eager_over_compiled": 1.4,
        "runtimes": {"eager": {"first_s": 9.0, "median_s": 7.0, "min_s": 6.9, "max_s": 7.1},
                     "compiled": {"first_s": 90.0, "median_s": 5.0, "min_s": 4.9, "max_s": 5.2}}}))
    report = gpu_check_report.summary(tmp_path)
    assert report["kernels"] == {"tests": 10, "failures": 1, "errors": 0, "skipped": 2, "passed": 7}
    assert report["precision"] is None and report["native"] is None
    assert report["steps"][2] == {"step": "native", "exit": "not wired", "seconds": 0}
    table = gpu_check_report.markdown(report)
    assert report["env"] == {"python": "3.12.3", "torch": "2.11.0+cu130", "triton": "3.6.0", "device": "NVIDIA H100"}
    assert "# GPU check: NVIDIA H100" in table and "| kernels | 1 | 40 |" in table
    assert "torch 2.11.0+cu130, triton 3.6.0" in table
    assert "7 passed, 1 failed" in table and "| compiled | 90.0 | 5.0 | 4.9–5.2 |" in table

