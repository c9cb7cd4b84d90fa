"""CI preflight: fail before the tests when a pinned ``[test]`` package is missing or at another
version, or when the golden data (``../shared/golden``) is absent — conditions that would
otherwise turn whole suites into skips."""

from __future__ import annotations

import re
import sys
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
    return found


if __name__ == "__main__":
    lines = problems()
    for line in lines:
        print(f"preflight: {line}", file=sys.stderr)
    sys.exit(1 if lines else 0)
