"""CI preflight: fail before the tests when a pinned ``[test]`` package is missing or at another
version, when the golden data (``../shared/golden``) is absent, or when the Triton Inference
Server bundled in the pytriton wheel cannot start here (its binary, libraries, the Python-backend
stub of this Python, a shared libpython) — conditions that would otherwise turn whole suites into
skips or into failures far from their cause."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN_FILES = ("nonstyle_scene0/golden.pt", "consistency_scene0/golden.pt", "tiny-sd/model_index.json")


def problems() -> list[str]:
    """One line per missing or mis-pinned test package and per missing golden file."""
    found = []
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    for requirement in extras:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", requirement)
        if match is None:
            found.append(f"[test] requirement {requirement!r} is not an exact pin")
            continue
        name, pinned = match.group(1), match.group(3)
        try:
            installed = version(name)
        except PackageNotFoundError:
            found.append(f"{name}=={pinned} (from the [test] extra) is not installed")
            continue
        if installed != pinned:
            found.append(f"{name} {installed} is installed, the [test] extra pins {pinned}")
    golden = REPO.parent / "shared" / "golden"
    found += [f"golden data missing: {golden / f}" for f in GOLDEN_FILES if not (golden / f).is_file()]
    return found + server_problems()


def server_problems() -> list[str]:
    """One line when the bundled ``tritonserver`` cannot run here: the server tests (``-m server``,
    in .ci/run) start it, and the Python-backend stub it runs needs a shared libpython."""
    from gnr_fast.errors import BackendUnavailableError
    from gnr_fast.serving import launcher

    if launcher.interpreter_libdir() is None:
        return [f"{sys.executable} has no shared libpython: the Triton Python-backend stub cannot load it"]
    with tempfile.TemporaryDirectory() as workdir:
        try:
            argv, env = launcher.tritonserver_command(Path(workdir) / "repository", Path(workdir))
        except BackendUnavailableError as error:
            return [f"the bundled tritonserver is not usable: {error}"]
        usage = subprocess.run([argv[0], "--help"], env=env, capture_output=True, text=True, timeout=120)
    if "Usage: tritonserver" not in usage.stdout + usage.stderr:  # it prints usage, exit status 1
        return [f"the bundled tritonserver does not start: {argv[0]} --help said {usage.stderr.strip()[-500:]!r}"]
    return []


if __name__ == "__main__":
    lines = problems()
    for line in lines:
        print(f"preflight: {line}", file=sys.stderr)
    sys.exit(1 if lines else 0)
