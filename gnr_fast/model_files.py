"""Files of a model folder every loader reads: where the bundled model lives, and JSON configs read
with an error that names the file and the fix (no torch, no diffusers: the lowest loading layer)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError

BUNDLED_MODEL = Path(__file__).parent / "models" / "shapes-v1"
"""The small model trained by this project's own scripts; the default of the API and CLI."""


def read_json(path: Path, advice: str = "Re-export or re-download the checkpoint.") -> dict:
    """A JSON config file; :class:`ModelLoadError` naming the file, the cause and ``advice`` if unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}. {advice}") from exc
