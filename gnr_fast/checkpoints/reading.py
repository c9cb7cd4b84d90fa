"""Read the tensors of a single-file checkpoint (.safetensors, or .ckpt/.pt/.pth via weights-only unpickling).

A ``.ckpt`` is never unpickled with arbitrary objects: ``torch.load(weights_only=True)`` only, and
a file that needs more is refused before loading (``torch.serialization.get_unsafe_globals_in_checkpoint``).
"""

from __future__ import annotations

import logging
import pickle
import struct
import zipfile
from collections import Counter
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, NotACheckpointError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_PROTO = 0x80  # the legacy torch.save format starts with a pickle protocol opcode


def is_single_file(path: Path) -> bool:
    """True when ``path`` is a file with a single-file checkpoint suffix (.safetensors, .ckpt, .pt, .pth)."""
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON object."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _looks_like_torch_save(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4)
    return head == _ZIP_MAGIC or (len(head) > 0 and head[0] == _PICKLE_PROTO)


def _not_a_checkpoint(path: Path, what: str) -> NotACheckpointError:
    return NotACheckpointError(
        f"{str(path)!r} is not a Stable Diffusion checkpoint: {what}. Pass a single-file SD 1.x/2.x checkpoint "
        "(.safetensors or .ckpt as released, e.g. v1-5-pruned-emaonly.safetensors) or a diffusers pipeline folder."
    )


def _corrupt(path: Path, exc: BaseException) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"cannot read {str(path)!r}: the file is truncated or corrupt ({type(exc).__name__}: {exc}). "
        "Download or copy it again (compare its size or SHA-256 with the source)."
    )


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not _looks_like_safetensors(path):
        raise _not_a_checkpoint(path, "it has no safetensors header")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise _corrupt(path, exc) from exc


def _read_pickle(path: Path) -> dict:
    if not _looks_like_torch_save(path):
        raise _not_a_checkpoint(path, "it is neither a torch.save zip archive nor a legacy torch pickle")
    if zipfile.is_zipfile(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
            raise _corrupt(path, exc) from exc
        if unsafe:
            raise CorruptCheckpointError(
                f"{str(path)!r} holds pickled Python objects besides tensors ({', '.join(unsafe[:4])}); gnr-fast "
                "loads .ckpt files with torch.load(weights_only=True) only and never runs their code. Convert the "
                "file to .safetensors with a tool you trust, or re-download the .safetensors release."
            )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        raise _corrupt(path, exc) from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint, keyed as in the file (a nested ``state_dict`` unwrapped).

    Raises :class:`NotACheckpointError` for a file of another kind or one without tensors, and
    :class:`CorruptCheckpointError` for a truncated/corrupt file or a pickle that needs more than
    weights-only loading.
    """
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        checkpoint = _read_safetensors(path)
    else:
        checkpoint = _read_pickle(path)
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(checkpoint, dict):
        raise _not_a_checkpoint(path, f"it holds a {type(checkpoint).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in checkpoint.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise _not_a_checkpoint(path, "it holds no tensors")
    return tensors


def weights_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype most of the checkpoint's elements are stored in (float16 for most releases)."""
    counts: Counter[torch.dtype] = Counter()
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32
