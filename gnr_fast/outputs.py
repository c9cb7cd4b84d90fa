"""Output locations: check, before any long work, that a result can be written where the user asked.

A command that inverts or edits for minutes and then cannot save its result has wasted the
user's time; these checks run first and raise :class:`~gnr_fast.errors.InputError` naming the
argument, the path and the reason.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import InputError


def check_writable_file(path: str | Path, what: str) -> Path:
    """Return ``path`` if a file can be written there; create missing parent folders.

    Raises :class:`InputError` when ``path`` is a folder or its folder cannot be created or
    written to (read-only or virtual file systems, a parent that is a file, permissions).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a folder; give a file path, e.g. {str(path / 'out.png')!r}")
    check_writable_dir(path.parent, what, shown=path)
    return path


def check_writable_dir(folder: str | Path, what: str, shown: str | Path | None = None) -> Path:
    """Return ``folder`` if files can be created in it (creating it if missing); else :class:`InputError`."""
    folder = Path(folder)
    shown = folder if shown is None else shown
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gnr-fast-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputError(f"{what} {str(shown)!r} cannot be written ({reason}); choose a writable location") from exc
    return folder
