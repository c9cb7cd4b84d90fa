"""Atomic checkpoint files and the run log shared by the training scripts.

A checkpoint is one ``torch.save`` dict written to ``<out>/checkpoint.pt`` via a temporary file
and ``os.replace``, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import pathlib
from pathlib import Path
from typing import Any

import torch

from ..world.scenes import BackgroundSpec, ObjectSpec, SceneSpec

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``out/checkpoint.pt`` atomically and return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CHECKPOINT_NAME
    tmp = out / (CHECKPOINT_NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


SPEC_ALIASES = ("gnr_shapes.world.scenes", "gnr_fast.world.scenes")
"""Older module paths of the scene specs in pickles: ``scenes`` before the specs had a module of
their own, and ``gnr_fast.world`` before the shapes world left the engine (issue 32)."""
SAFE_GLOBALS: list = [pathlib.PosixPath, pathlib.WindowsPath, SceneSpec, BackgroundSpec, ObjectSpec,
                      *((cls, f"{module}.{cls.__name__}") for module in SPEC_ALIASES
                        for cls in (SceneSpec, BackgroundSpec, ObjectSpec))]
"""Classes beyond tensors and containers that a checkpoint may hold (the run's ``args`` hold paths;
a UNet run's latent pool holds the scene specs its relaxed captions are drawn from). The specs are
also allowed under the :data:`SPEC_ALIASES` paths, so pools written by earlier code still load."""


def load_torch_file(path: Path) -> Any:
    """``torch.load`` without pickle's code execution: tensors, containers, numbers, strings and
    :data:`SAFE_GLOBALS` only (``weights_only=True``); anything else raises ``UnpicklingError``."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """Load ``out/checkpoint.pt`` if it exists, else return None (see :func:`load_torch_file`)."""
    path = out / CHECKPOINT_NAME
    if not path.exists():
        return None
    logger.info("resuming from %s", path)
    return load_torch_file(path)


class RunLog:
    """Appends one line per event to ``out/train.log`` (flushed immediately)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "train.log"

    def write(self, line: str) -> None:
        """Append ``line`` to the log file."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line.rstrip("\n") + "\n")
