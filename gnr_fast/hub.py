"""Hugging Face hub ids (``org/name``) resolved from the local hub cache, never from the network.

Users whose models were downloaded earlier by diffusers (``StableDiffusionPipeline.from_pretrained
("runwayml/stable-diffusion-v1-5")``) hold them in the hub cache, laid out as
``<cache>/models--org--name/snapshots/<commit>/`` with ``refs/main`` naming the commit. gnr-fast
reads that folder as it reads any local pipeline folder; it never downloads, whatever
``HF_HUB_OFFLINE`` says (offline is forced: nothing here opens a connection).

The cache folder is the one ``huggingface_hub`` uses, read from the environment at call time:
``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""``org/name`` as the hub spells repository ids (one slash, no path syntax such as ``./`` or ``..``)."""

DEFAULT_REVISION = "main"


def hub_cache_dir() -> Path:
    """The hub cache folder the environment names (see the module docstring for the order)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return xdg / "huggingface" / "hub"


def is_hub_id(model: str | Path) -> bool:
    """Whether ``model`` names a hub repository rather than a local path: a string ``org/name`` with
    no local file or folder of that name (a local path always wins)."""
    return isinstance(model, str) and HUB_ID.match(model) is not None and ".." not in model and not Path(model).exists()


def resolve_hub_id(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the hub cache (the commit ``refs/main`` names).

    Raises :class:`ModelNotFoundError` saying where it looked and how to fetch the model on a
    machine with network access.
    """
    cache = hub_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / DEFAULT_REVISION
    snapshot = repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    if snapshot is None or not snapshot.is_dir():
        looked = f"{snapshot}" if snapshot is not None else f"{ref} (to name a snapshot in {repo / 'snapshots'})"
        raise ModelNotFoundError(
            f"model {repo_id!r} is neither a local folder nor in the Hugging Face cache: looked for {looked} "
            f"(cache {str(cache)!r}, from HF_HUB_CACHE / HF_HOME). gnr-fast never downloads; fetch it where there "
            f"is network with `hf download {repo_id}` (or diffusers' from_pretrained) and copy the cache here or "
            "point HF_HUB_CACHE at it, or pass a local diffusers folder."
        )
    return snapshot


def resolve_model(model: str | Path | None) -> Path | None:
    """``model`` as a local path: a hub id becomes its cached snapshot folder; ``None`` and local paths
    are returned as they are (``None``: the bundled model, resolved by the loader)."""
    if model is None:
        return None
    return resolve_hub_id(model) if is_hub_id(model) else Path(model)
