"""The wire protocol of the ``gnr_edit`` and ``gnr_invert`` Triton models, shared by servers and client.

Every tensor holds one element per request, with a batch dimension: shape ``[1, 1]`` on
``gnr-fast serve`` (batches of one), ``[B, 1]`` on an exported repository's dynamic batcher:

=============  =====  ==========================================================================
gnr_edit in    type   meaning
=============  =====  ==========================================================================
image          BYTES  the encoded input image (PNG or JPEG file bytes)
source_prompt  BYTES  UTF-8 prompt describing the input image
target_prompt  BYTES  UTF-8 prompt describing the edit
preset         BYTES  optional: ``nonstyle``, ``style`` or ``shapes``; default: the model's (gnr_fast.json)
config         BYTES  optional: an edit config in the authors' format, as a JSON object
steps          INT32  optional: DDIM steps (default: the server's)
=============  =====  ==========================================================================

``gnr_edit`` answers ``edited_image`` (PNG bytes) and ``info`` (UTF-8 JSON: ``cache_hit``,
``timings``, ``batch_size``, ``unet_calls``, …); ``gnr_invert`` takes ``image``,
``source_prompt`` and ``steps`` and answers ``info``. A refused or failed request is a Triton
error whose message ends with a line ``gnr_fast.<module>.<ErrorClass>: <message>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import InputError

EDIT_MODEL = "gnr_edit"
INVERT_MODEL = "gnr_invert"


@dataclass(frozen=True)
class Field:
    """One input or output tensor: its name, Triton datatype and whether a request may omit it."""

    name: str
    datatype: str  # "BYTES" or "INT32"
    optional: bool = False

    @property
    def numpy_dtype(self) -> type:
        return np.bytes_ if self.datatype == "BYTES" else np.int32


EDIT_INPUTS = (
    Field("image", "BYTES"),
    Field("source_prompt", "BYTES"),
    Field("target_prompt", "BYTES"),
    Field("preset", "BYTES", optional=True),
    Field("config", "BYTES", optional=True),
    Field("steps", "INT32", optional=True),
)
EDIT_OUTPUTS = (Field("edited_image", "BYTES"), Field("info", "BYTES"))
INVERT_INPUTS = (Field("image", "BYTES"), Field("source_prompt", "BYTES"), Field("steps", "INT32", optional=True))
INVERT_OUTPUTS = (Field("info", "BYTES"),)


def read_inputs(data: Mapping[str, np.ndarray], fields: tuple[Field, ...]) -> dict[str, bytes | int | None]:
    """The Python values of one request's tensors (``None`` for omitted optional ones).

    Raises :class:`InputError` for a missing required input or a tensor not holding one element.
    """
    values: dict[str, bytes | int | None] = {}
    for spec in fields:
        array = data.get(spec.name)
        if array is None:
            if not spec.optional:
                raise InputError(f"input {spec.name!r} is missing")
            values[spec.name] = None
            continue
        array = np.asarray(array)
        if array.size != 1:
            raise InputError(f"input {spec.name!r} must hold one element per request, got shape {list(array.shape)}")
        item = array.reshape(-1)[0]
        if spec.datatype == "BYTES":
            if isinstance(item, str):
                item = item.encode("utf-8")
            if not isinstance(item, (bytes, np.bytes_)):
                raise InputError(f"input {spec.name!r} must be BYTES, got {type(item).__name__}")
            values[spec.name] = bytes(item)
        else:
            values[spec.name] = int(item)
    return values


def bytes_tensor(value: bytes, batched: bool = False) -> np.ndarray:
    """A one-element BYTES tensor (object dtype keeps trailing NUL bytes); ``[1, 1]`` when ``batched``."""
    array = np.empty((1, 1) if batched else (1,), dtype=object)
    array.reshape(-1)[0] = value
    return array


_ERROR_LINE = re.compile(r"^(gnr_fast(?:\.\w+)*)\.(\w+): (.+)$", re.MULTILINE)


def error_line(exc: BaseException) -> str:
    """How a server reports ``exc``: ``gnr_fast.<module>.<Class>: <message>`` on one line."""
    message = " ".join(str(exc).splitlines())
    cls = type(exc)
    if cls.__module__.startswith("gnr_fast"):
        return f"{cls.__module__}.{cls.__qualname__}: {message}"
    return f"gnr_fast.errors.GnrError: {cls.__name__}: {message}"


def parse_error(text: str) -> tuple[str, str] | None:
    """(error class name, message) from a Triton error message ending with an :func:`error_line`, else None."""
    matches = _ERROR_LINE.findall(text)
    if not matches:
        return None
    _, name, message = matches[-1]
    return name, message.strip()
