"""A typed client for a gnr-fast Triton server (``gnr-fast serve`` or an exported repository).

    with GnrClient("127.0.0.1:8000") as client:          # or "grpc://127.0.0.1:8001"
        image, info = client.edit("cat.png", "a photo of a cat", "a photo of a dog")

Requests are built from :mod:`gnr_fast.serving.protocol`; the batch dimension is added when the
model batches (an exported repository with Triton's dynamic batcher). A server-side refusal or
failure is raised as the library's own error (:class:`~gnr_fast.errors.InputError`,
:class:`~gnr_fast.errors.ConfigError`, :class:`~gnr_fast.errors.GuidanceError`, …) with the
server's message; anything else as :class:`ServerError`. Needs ``tritonclient``
(``pip install "gnr-fast[serve]"``).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from PIL import Image

from . import errors
from .errors import GnrError, InputError, ServerError
from .serving.launcher import require_tritonclient
from .serving.protocol import (
    EDIT_INPUTS,
    EDIT_MODEL,
    INVERT_INPUTS,
    INVERT_MODEL,
    Field,
    bytes_tensor,
    parse_error,
)

Protocol = Literal["http", "grpc"]


class GnrClient:
    """Client of the ``gnr_edit`` / ``gnr_invert`` models over Triton's HTTP or gRPC endpoint.

    ``url`` is ``host:port``, optionally prefixed by ``http://`` or ``grpc://`` (which sets the
    protocol). ``timeout_s`` bounds each call, connection included. Not thread-safe: use one
    client per thread.
    """

    def __init__(self, url: str = "127.0.0.1:8000", protocol: Protocol | None = None, timeout_s: float = 600.0) -> None:
        require_tritonclient()
        scheme, _, address = url.rpartition("://")
        protocol = protocol or (scheme if scheme else "http")
        if protocol not in ("http", "grpc") or (scheme and scheme != protocol):
            raise InputError(f"url {url!r} / protocol {protocol!r}: use http://host:port or grpc://host:port")
        self.url, self.protocol, self.timeout_s = address, protocol, float(timeout_s)
        if protocol == "http":
            import tritonclient.http as module

            self._client = module.InferenceServerClient(
                address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
        else:
            import tritonclient.grpc as module

            self._client = module.InferenceServerClient(address)
        self._module = module
        self._batched: dict[str, bool] = {}

    # --- health -------------------------------------------------------------------------------

    def is_live(self) -> bool:
        return self._health(lambda **kw: self._client.is_server_live(**kw))

    def is_ready(self, model: str = EDIT_MODEL) -> bool:
        """Whether the server is ready and ``model`` loaded: the readiness an edit needs.

        Triton's server readiness alone is not enough: pytriton starts Triton with no model and
        loads them afterwards, and a server with no model loaded is "ready"
        (``/v2/health/ready`` answered 200 about 3 s before ``gnr_edit`` could answer; issue 17).
        Probes and load balancers must use ``GET /v2/models/gnr_edit/ready`` (gRPC ``ModelReady``).
        """
        return self._health(lambda **kw: self._client.is_server_ready(**kw) and self._client.is_model_ready(model, **kw))

    def wait_ready(self, timeout_s: float = 60.0, model: str = EDIT_MODEL) -> None:
        """Poll readiness until ``timeout_s``; raise :class:`ServerError` if it never comes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready(model):
                return
            time.sleep(0.2)
        raise ServerError(
            f"the server at {self.url} was not ready with model {model!r} within {timeout_s:g}s "
            "(is a gnr-fast server running at this address, and has it finished loading?)"
        )

    def _health(self, probe) -> bool:
        from tritonclient.utils import InferenceServerException

        kwargs = {"client_timeout": min(self.timeout_s, 10.0)} if self.protocol == "grpc" else {}
        try:
            return bool(probe(**kwargs))
        except (InferenceServerException, OSError):
            return False

    # --- calls --------------------------------------------------------------------------------

    def edit(
        self,
        image: bytes | str | Path | Image.Image,
        source_prompt: str,
        target_prompt: str,
        preset: str | None = None,
        config: Mapping[str, Any] | str | None = None,
        steps: int | None = None,
    ) -> tuple[Image.Image, dict[str, Any]]:
        """Edit ``image`` toward ``target_prompt``; returns the edited image and the server's info
        (``cache_hit``, ``timings``, ``batch_size``, ``unet_calls``, …).

        ``config`` is an edit config in the authors' format: a dict or its JSON text.
        """
        values = {
            "image": _image_bytes(image),
            "source_prompt": source_prompt.encode("utf-8"),
            "target_prompt": target_prompt.encode("utf-8"),
            "preset": None if preset is None else preset.encode("utf-8"),
            "config": None if config is None else (config if isinstance(config, str) else json.dumps(config)).encode(),
            "steps": steps,
        }
        outputs = self._infer(EDIT_MODEL, EDIT_INPUTS, values, ("edited_image", "info"))
        with Image.open(io.BytesIO(outputs["edited_image"])) as opened:
            edited = opened.convert("RGB")
        return edited, json.loads(outputs["info"])

    def invert(self, image: bytes | str | Path | Image.Image, source_prompt: str, steps: int | None = None) -> dict[str, Any]:
        """Have the server invert and cache ``image`` so later edits of it skip the inversion."""
        values = {"image": _image_bytes(image), "source_prompt": source_prompt.encode("utf-8"), "steps": steps}
        return json.loads(self._infer(INVERT_MODEL, INVERT_INPUTS, values, ("info",))["info"])

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "GnrClient":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _infer(self, model: str, fields: tuple[Field, ...], values: dict, output_names: tuple[str, ...]) -> dict[str, bytes]:
        from tritonclient.utils import InferenceServerException

        try:
            batched = self._is_batched(model)
            inputs = []
            for spec in fields:
                value = values.get(spec.name)
                if value is None:
                    continue
                if not isinstance(value, (bytes, int)) or isinstance(value, bool):
                    raise InputError(f"{spec.name} must be {'text' if spec.datatype == 'BYTES' else 'an integer'}")
                array = bytes_tensor(value, batched) if spec.datatype == "BYTES" else np.full(
                    (1, 1) if batched else (1,), value, dtype=np.int32
                )
                tensor = self._module.InferInput(spec.name, list(array.shape), spec.datatype)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            requested = [self._module.InferRequestedOutput(name) for name in output_names]
            kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            result = self._client.infer(model, inputs, outputs=requested, **kwargs)
        except InferenceServerException as exc:
            raise _server_error(exc.message() or str(exc)) from None
        except OSError as exc:
            raise ServerError(f"cannot reach the gnr-fast server at {self.url} ({self.protocol}): {exc}") from exc
        return {name: bytes(result.as_numpy(name).reshape(-1)[0]) for name in output_names}

    def _is_batched(self, model: str) -> bool:
        """Whether ``model`` takes a batch dimension (Triton's max_batch_size > 0)."""
        if model not in self._batched:
            if self.protocol == "grpc":
                config = self._client.get_model_config(model, as_json=True, client_timeout=self.timeout_s)["config"]
            else:
                config = self._client.get_model_config(model)
            self._batched[model] = int(config.get("max_batch_size", 0) or 0) > 0
        return self._batched[model]


def _image_bytes(image: bytes | str | Path | Image.Image) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file {str(path)!r} does not exist")
        return path.read_bytes()
    raise InputError(f"image must be bytes, a file path or a PIL image, got {type(image).__name__}")


_BUSY_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")  # Triton's queue policy refusals
_NOT_LOADED_MESSAGES = ("has no available versions", "is not found", "is not ready")


def _server_error(text: str) -> GnrError:
    """The library error a server's error message names (its own message); Triton's queue-policy
    refusals as :class:`ServiceBusyError`; else :class:`ServerError`."""
    if any(message in text for message in _BUSY_MESSAGES):
        return errors.ServiceBusyError(f"the server is busy ({text.strip()}); retry later or on another instance")
    if "unknown model" in text and any(message in text for message in _NOT_LOADED_MESSAGES):
        return ServerError(
            f"the server has not loaded the model yet ({text.strip()}); wait until GET /v2/models/{EDIT_MODEL}/ready "
            "answers 200 (GnrClient.wait_ready, gnr-fast client --wait-ready)"
        )
    parsed = parse_error(text)
    if parsed is not None:
        name, message = parsed
        from .serving import service

        cls = getattr(errors, name, None) or getattr(service, name, None)
        if isinstance(cls, type) and issubclass(cls, GnrError):
            return cls(message)
    return ServerError(f"the server answered with an error: {text.strip()}")
