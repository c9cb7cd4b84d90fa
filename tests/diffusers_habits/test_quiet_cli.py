"""The CLI prints only gnr-fast's own output (with and without triton importable); --verbose shows the
third-party notes it hides; a mistyped option is named in a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NO_TRITON = "import sys; sys.modules['triton'] = None  # `import triton` fails, find_spec('triton') is None\n"


def cli_env(triton: bool, folder: Path) -> dict[str, str]:
    """The CLI's environment; without ``triton`` a sitecustomize in ``folder`` makes triton unimportable."""
    env = {**os.environ, "PYTHONWARNINGS": ""}
    if not triton:
        (folder / "sitecustomize.py").write_text(NO_TRITON)
        env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module", params=["triton", "no-triton"])
def env(request, tmp_path_factory) -> dict[str, str]:
    return cli_env(request.param == "triton", tmp_path_factory.mktemp("site"))


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gnr_fast.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_triton_blocker_works(env, tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('triton'))"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    blocked = any((Path(p) / "sitecustomize.py").is_file() for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)
    assert (probe.stdout.strip() == "None") == blocked


def test_help_prints_only_the_help(env, tmp_path):
    proc = run_cli(["--help"], env, tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: gnr-fast")


def test_edit_prints_only_its_summary_line(env, tmp_path, tiny_model_path, sample_image):
    sample_image.save(tmp_path / "in.png")
    proc = run_cli(["edit", "in.png", "-s", "a red circle", "-t", "a green circle", "--model", str(tiny_model_path),
                    "--steps", "2", "--quiet", "-o", "out.png"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("wrote out.png (64x64)") and len(proc.stdout.splitlines()) == 1


def test_verbose_shows_the_hidden_notes(tmp_path, tiny_model_path, sample_image):
    env = cli_env(False, tmp_path)
    sample_image.save(tmp_path / "in.png")
    proc = run_cli(["edit", "in.png", "-s", "a red circle", "-t", "a green circle", "--model", str(tiny_model_path),
                    "--steps", "1", "--quiet", "--verbose", "-o", "out.png"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "INFO gnr_fast.loading: loaded" in proc.stderr
    assert "Triton not available, find_triton_kernels = []" in proc.stderr  # logged while importing gnr_fast


def test_demo_prints_only_its_summary_line(tmp_path):
    """The bundled model, one step, triton unimportable (where torch's note came from)."""
    proc = run_cli(["demo", "--steps", "1", "--quiet", "-o", "demo.png"], cli_env(False, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("wrote demo.png: ") and len(proc.stdout.splitlines()) == 1


def test_mistyped_option_is_named_in_one_line(tmp_path):
    proc = run_cli(["edit", "in.png", "-s", "a red circle", "--target-prompt", "a green circle"], dict(os.environ), tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("gnr-fast edit: error: unrecognized option '--target-prompt'; did you mean -t/--target? "
                           "(see gnr-fast edit --help)\n")
