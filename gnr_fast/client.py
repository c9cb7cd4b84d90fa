"""A typed client for a gnr-fast Triton server (``gnr-fast serve`` or an exported repository).

    with GnrClient("127.0.0.1:8000") as client:          # or "grpc://127.0.0.1:8001"
        image, info = client.edit("cat.png", "a photo of a cat", "a photo of a dog")

Requests are built from :mod:`gnr_fast.serving.protocol`; the batch dimension is added when the
model batches (an exported repository with Triton's dynamic batcher). A server-side refusal or
failure is raised as the library's own error (:class:`~gnr_fast.errors.InputError`,
:class:`~gnr_fast.errors.ConfigError`, :class:`~gnr_fast.errors.GuidanceError`, …) with the
server's message; a replica that cannot be reached, drops the connection or whose balancer
answers 502/503/504 as :class:`~gnr_fast.errors.ReplicaUnavailableError`; anything else as
:class:`ServerError`. Needs ``tritonclient`` (``pip install "gnr-fast[serve]"``).

Several replicas (issue 37): ``affinity=True`` sends each request's route key
(:mod:`gnr_fast.serving.routing`) for a balancer to hash, so repeat edits of an image meet the
replica that cached its inversion; ``retries=N`` re-sends a request that was refused as busy or
shutting down, or got no answer, up to N more times — to the next of ``failover`` addresses, or
through the balancer with a retry key that hashes to another point of its ring. A retry is safe:
an edit is a pure function of its inputs, the same request gives the same image on any replica.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from PIL import Image

from . import errors
from .errors import GnrError, InputError, ServerError
from .serving.launcher import require_tritonclient
from .serving.routing import ROUTE_HEADER, retry_key, route_key
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

logger = logging.getLogger(__name__)

RETRY_BACKOFF_S = 0.25
"""Pause before retry n: n × this (the balancer marks a dead replica failed; a busy one drains)."""


class GnrClient:
    """Client of the ``gnr_edit`` / ``gnr_invert`` models over Triton's HTTP or gRPC endpoint.

    ``url`` is ``host:port``, optionally prefixed by ``http://`` or ``grpc://`` (which sets the
    protocol); ``failover`` more addresses of the same protocol (other replicas) that retries go
    to in turn (later requests start at the address that answered last). ``timeout_s`` bounds each call, connection included. ``affinity`` sends the route
    key header; ``retries`` is how many times a request refused as busy / shutting down or left
    unanswered is re-sent (:attr:`retried` counts them). Not thread-safe: use one client per thread.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8000",
        protocol: Protocol | None = None,
        timeout_s: float = 600.0,
        affinity: bool = False,
        retries: int = 0,
        failover: Sequence[str] = (),
    ) -> None:
        require_tritonclient()
        scheme, _, address = url.rpartition("://")
        protocol = protocol or (scheme if scheme else "http")
        if protocol not in ("http", "grpc") or (scheme and scheme != protocol):
            raise InputError(f"url {url!r} / protocol {protocol!r}: use http://host:port or grpc://host:port")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError(f"retries must be a non-negative integer, got {retries!r}")
        self.url, self.protocol, self.timeout_s = address, protocol, float(timeout_s)
        self.affinity, self.retries = bool(affinity), retries
        self.retried = 0  # requests re-sent after a refusal or a lost answer, over this client's life
        self.addresses = [address]
        for other in failover:
            other_scheme, _, other_address = other.rpartition("://")
            if other_scheme and other_scheme != protocol:
                raise InputError(f"failover address {other!r} is not a {protocol} address like {url!r}")
            self.addresses.append(other_address)
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
        self._module = module
        self._clients: dict[str, Any] = {}
        self._client = self._connection(address)
        self._current = 0  # index into addresses: the replica that answered last (failover sticks)
        self._batched: dict[str, bool] = {}

    def _connection(self, address: str):
        """The tritonclient client of ``address`` (made on first use)."""
        if address not in self._clients:
            if self.protocol == "http":
                self._clients[address] = self._module.InferenceServerClient(
                    address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            else:
                self._clients[address] = self._module.InferenceServerClient(address)
        return self._clients[address]

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
        except (InferenceServerException, OSError, http.client.HTTPException):
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
        image = _image_bytes(image)
        values = {
            "image": image,
            "source_prompt": source_prompt.encode("utf-8"),
            "target_prompt": target_prompt.encode("utf-8"),
            "preset": None if preset is None else preset.encode("utf-8"),
            "config": None if config is None else (config if isinstance(config, str) else json.dumps(config)).encode(),
            "steps": steps,
        }
        key = route_key(image, source_prompt, steps) if self.affinity else None
        outputs = self._infer(EDIT_MODEL, EDIT_INPUTS, values, ("edited_image", "info"), key)
        with Image.open(io.BytesIO(outputs["edited_image"])) as opened:
            edited = opened.convert("RGB")
        return edited, json.loads(outputs["info"])

    def invert(self, image: bytes | str | Path | Image.Image, source_prompt: str, steps: int | None = None) -> dict[str, Any]:
        """Have the server invert and cache ``image`` so later edits of it skip the inversion."""
        image = _image_bytes(image)
        values = {"image": image, "source_prompt": source_prompt.encode("utf-8"), "steps": steps}
        key = route_key(image, source_prompt, steps) if self.affinity else None
        return json.loads(self._infer(INVERT_MODEL, INVERT_INPUTS, values, ("info",), key)["info"])

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def __enter__(self) -> "GnrClient":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _infer(
        self, model: str, fields: tuple[Field, ...], values: dict, output_names: tuple[str, ...], key: str | None = None
    ) -> dict[str, bytes]:
        """The outputs of one request, re-sent up to ``self.retries`` times when a replica refuses
        it as busy or shutting down or leaves it unanswered; other errors are raised at once."""
        attempt = 0
        while True:
            index = (self._current + attempt) % len(self.addresses)
            # Behind one balancer address a retry takes another point of its hash ring; with
            # several addresses the next address is already another replica.
            sent_key = retry_key(key, attempt) if key is not None and len(self.addresses) == 1 else key
            try:
                outputs = self._infer_once(self.addresses[index], model, fields, values, output_names, sent_key)
                self._current = index  # later requests start at the replica that answered
                return outputs
            except (errors.ServiceBusyError, errors.ReplicaUnavailableError) as exc:
                if attempt >= self.retries:
                    raise
                attempt += 1
                self.retried += 1
                logger.info("retrying %s (attempt %d of %d): %s", model, attempt + 1, self.retries + 1, exc)
                time.sleep(RETRY_BACKOFF_S * attempt)

    def _infer_once(
        self, address: str, model: str, fields: tuple[Field, ...], values: dict, output_names: tuple[str, ...],
        key: str | None,
    ) -> dict[str, bytes]:
        from tritonclient.utils import InferenceServerException

        client = self._connection(address)
        try:
            batched = self._is_batched(client, model)
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
            headers = {ROUTE_HEADER: key} if key is not None else None
            result = client.infer(model, inputs, outputs=requested, headers=headers, **kwargs)
        except InferenceServerException as exc:
            raise _server_error(exc.message() or str(exc), exc.status(), address) from None
        except OSError as exc:
            raise errors.ReplicaUnavailableError(
                f"cannot reach the gnr-fast server at {address} ({self.protocol}): {exc}"
            ) from exc
        except http.client.HTTPException as exc:  # geventhttpclient: the connection closed mid-answer
            raise errors.ReplicaUnavailableError(
                f"the gnr-fast server at {address} closed the connection before answering "
                f"({type(exc).__name__}: {exc}); it may have stopped"
            ) from exc
        return {name: bytes(result.as_numpy(name).reshape(-1)[0]) for name in output_names}

    def _is_batched(self, client, model: str) -> bool:
        """Whether ``model`` takes a batch dimension (Triton's max_batch_size > 0); asked once, of
        the first replica that answers (every replica of a group serves the same models)."""
        if model not in self._batched:
            if self.protocol == "grpc":
                config = client.get_model_config(model, as_json=True, client_timeout=self.timeout_s)["config"]
            else:
                config = client.get_model_config(model)
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


_BUSY_MESSAGES = ("Exceeds maximum queue size",)  # Triton's queue-policy refusals
_TIMEOUT_MESSAGES = ("Request timeout expired",)
_GATEWAY_STATUSES = ("502", "503", "504")  # a balancer found no replica to answer (HTTP)
_UNAVAILABLE_STATUSES = ("StatusCode.UNAVAILABLE",)  # gRPC: no connection, or the balancer's 502/503
_NOT_LOADED_MESSAGES = ("has no available versions", "is not found", "is not ready")


def _server_error(text: str, status: str | None = None, address: str = "") -> GnrError:
    """The library error a server's error message names (its own message); Triton's queue-policy
    refusals as :class:`ServiceBusyError` / :class:`RequestTimeoutError`; a gateway or transport
    status as :class:`ReplicaUnavailableError`; else :class:`ServerError`."""
    if any(message in text for message in _BUSY_MESSAGES):
        return errors.ServiceBusyError(f"the server is busy ({text.strip()}); retry later or on another instance")
    if any(message in text for message in _TIMEOUT_MESSAGES):
        return errors.RequestTimeoutError(f"the server is overloaded ({text.strip()}); retry later or on another instance")
    if parse_error(text) is None and (status in _GATEWAY_STATUSES or status in _UNAVAILABLE_STATUSES):
        return errors.ReplicaUnavailableError(
            f"no replica answered at {address} (status {status}: {' '.join(text.split())[:300]}); "
            "retry, or on another instance"
        )
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
