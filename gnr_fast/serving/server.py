"""``gnr-fast serve``: the edit service on a real Triton Inference Server (pytriton).

Two models, with the tensors of :mod:`gnr_fast.serving.protocol`:

* ``gnr_edit`` — edit an image; the inversion comes from the cache when the same image, source
  prompt, steps and model were inverted before (and the source pass from its source cache);
* ``gnr_invert`` — compute and cache an inversion ahead of the edits.

Batching is the service's own queue (:class:`~gnr_fast.serving.service.EditService`): Triton
runs ``gnr_edit`` with as many instances as edits may share a batch, each instance hands its one
request to the queue, and the engine thread runs up to ``max_batch`` compatible edits through
:func:`~gnr_fast.batch.edit_batch`. Unlike Triton's dynamic batcher (which fails every request of a
batch when one fails), a bad request is answered with its own error. Triton's scheduler, with
batches of one, only bounds the waiting requests (:func:`model_config`).

Readiness: ``GET /v2/models/gnr_edit/ready`` is the probe. ``/v2/health/ready`` is not: pytriton
starts Triton in explicit model-control mode with no model and loads the models over the
repository API, and strict readiness counts loaded models only, so it answers 200 before
``gnr_edit`` exists. (Triton loading the models before it opens its endpoints — pytriton's local
model store — would fix that, but then pytriton's instance-handshake race, below, kills Triton at
start and pytriton waits 120 s before it notices; measured: 1 of 2 starts.)

Metrics: Triton's own on ``metrics_port``; the service's (cache, batches, queue depth, refusals by
reason, per-phase latency; :mod:`gnr_fast.serving.metrics`) on ``service_metrics_port`` when set.

SIGTERM/SIGINT stop the server gracefully: the service refuses requests it has not accepted yet
("shutting down", :class:`~gnr_fast.errors.ServiceBusyError`), Triton stops taking requests and
waits up to ``exit_timeout_s`` for the ones in flight, which the engine thread finishes. A client
that disconnects does not stop its edit: pytriton 0.7.0 hands the model no cancellation, so an
accepted edit runs to the end and its answer is dropped; a request still queued when its
``request_timeout_s`` passes is refused without running. A start whose model load hits pytriton's
race between a model's instances is retried (:func:`start_triton`). Triton's model-control,
repository, shared-memory, statistics, trace and logging APIs stay behind pytriton's generated
access token (its default security config), so clients can neither load nor unload models.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..editor import Editor
from ..errors import ConfigError
from .launcher import prepare_environment, require_pytriton
from .protocol import (
    EDIT_INPUTS,
    EDIT_MODEL,
    EDIT_OUTPUTS,
    INVERT_INPUTS,
    INVERT_MODEL,
    INVERT_OUTPUTS,
    Field,
    bytes_tensor,
    read_inputs,
)
from .metrics import MetricsEndpoint, ServiceMetrics
from .service import EditService, Job, Outcome, ServiceConfig, encode_png

logger = logging.getLogger(__name__)

START_ATTEMPTS = 3  # Triton starts tried when a model instance misses pytriton's handshake


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens and how Triton runs the models."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    service_metrics_port: int | None = None  # the service's Prometheus endpoint (serving.metrics); None: not served
    exit_timeout_s: int = 30  # SIGTERM: wait this long for requests in flight
    edit_instances: int | None = None  # concurrent gnr_edit requests; default: the service's max_batch
    invert_instances: int = 1
    log_verbose: int = 0  # Triton's verbose log level

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"{name.replace('_', '-')} must be a TCP port in [1, 65535], got {port!r}")
        if self.service_metrics_port is not None:
            port = self.service_metrics_port
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"service-metrics-port must be a TCP port in [1, 65535], got {port!r}")
        ports = [p for p in (self.http_port, self.grpc_port, self.metrics_port, self.service_metrics_port) if p is not None]
        if len(set(ports)) != len(ports):
            raise ConfigError(f"http, grpc, metrics and service metrics ports must differ, got {ports}")
        for name in ("exit_timeout_s", "invert_instances"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.edit_instances is not None and (not isinstance(self.edit_instances, int) or self.edit_instances < 1):
            raise ConfigError(f"edit_instances must be a positive integer, got {self.edit_instances!r}")


class EditModel:
    """The inference callable of one ``gnr_edit`` instance (each Triton instance has its own)."""

    def __init__(self, service: EditService, metrics: ServiceMetrics) -> None:
        self.service, self.metrics = service, metrics

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        return [_counted(self.metrics, EDIT_MODEL, self._answer, request) for request in requests]  # one per call

    def _answer(self, request) -> tuple[dict[str, np.ndarray], Job, Outcome]:
        values = read_inputs(request.data, EDIT_INPUTS)
        job = self.service.edit_job(
            values["image"],
            values["source_prompt"],
            values["target_prompt"],
            preset=values["preset"],
            config_json=values["config"],
            steps=values["steps"],
        )
        outcome = self.service.wait(job)
        png = encode_png(outcome.result.image)
        info = json.dumps(outcome.info(job)).encode()
        return {"edited_image": bytes_tensor(png, batched=True), "info": bytes_tensor(info, batched=True)}, job, outcome


class InvertModel:
    """The inference callable of one ``gnr_invert`` instance."""

    def __init__(self, service: EditService, metrics: ServiceMetrics) -> None:
        self.service, self.metrics = service, metrics

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        return [_counted(self.metrics, INVERT_MODEL, self._answer, request) for request in requests]

    def _answer(self, request) -> tuple[dict[str, np.ndarray], Job, Outcome]:
        values = read_inputs(request.data, INVERT_INPUTS)
        job = self.service.invert_job(values["image"], values["source_prompt"], steps=values["steps"])
        outcome = self.service.wait(job)
        info = outcome.info(job)
        info["cache"] = _cache_info(self.service)
        return {"info": bytes_tensor(json.dumps(info).encode(), batched=True)}, job, outcome


def _counted(metrics: ServiceMetrics, model: str, answer: Callable, request) -> dict[str, np.ndarray]:
    """``answer(request)``'s tensors, counting the request as served or refused in ``metrics``."""
    in_flight = metrics.in_flight.labels(model)
    in_flight.inc()
    try:
        tensors, job, outcome = answer(request)
    except Exception as error:  # counted, then re-raised for pytriton to answer with it
        metrics.record_refused(model, error)
        raise
    finally:
        in_flight.dec()
    metrics.record_served(model, job, outcome)
    return tensors


def check_addresses(config: ServerConfig) -> None:
    """Raise :class:`ConfigError` naming the endpoint when Triton could not listen on one of
    ``config``'s ports: another process listens there, or ``host`` is no address of this machine.

    Without this check Triton's start fails only after pytriton's start-up timeout, with a traceback.
    """
    endpoints = [("http", config.http_port), ("grpc", config.grpc_port), ("metrics", config.metrics_port)]
    if config.service_metrics_port is not None:
        endpoints.append(("service metrics", config.service_metrics_port))
    for name, port in endpoints:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                config.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the servers: TIME_WAIT is no conflict
                probe.bind(address)
        except OSError as error:
            reason = error.strerror or str(error)
            raise ConfigError(
                f"cannot serve {name} on {config.host}:{port}: {reason.lower()}; choose another {name} port or host"
            ) from None


def _cache_info(service: EditService) -> dict:
    stats = service.cache.stats()
    return {"hits": stats.hits, "misses": stats.misses, "entries": stats.entries, "bytes": stats.nbytes}


def _tensors(fields: tuple[Field, ...]) -> list:
    from pytriton.model_config import Tensor

    return [Tensor(name=f.name, dtype=f.numpy_dtype, shape=(1,), optional=f.optional) for f in fields]


def model_config(service_config: ServiceConfig):
    """The Triton config of both models: batches of one request (each instance hands its request
    to the service's own batching queue), behind Triton's queue holding at most
    ``service_config.max_queue`` requests — one more is refused at once ("Exceeds maximum queue
    size", :class:`~gnr_fast.errors.ServiceBusyError` in the client) — where a request that waits
    longer than ``request_timeout_s`` is rejected without running."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, TimeoutAction

    policy = QueuePolicy(
        timeout_action=TimeoutAction.REJECT,
        default_timeout_microseconds=int(service_config.request_timeout_s * 1e6),
        max_queue_size=service_config.max_queue,
    )
    batcher = DynamicBatcher(max_queue_delay_microseconds=0, default_queue_policy=policy)
    return ModelConfig(batching=True, max_batch_size=1, batcher=batcher)


def serve(
    editor: Editor,
    service_config: ServiceConfig | None = None,
    server_config: ServerConfig | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[ServerConfig], None] | None = None,
) -> bool:
    """Serve ``editor`` until ``stop`` is set, SIGTERM/SIGINT arrive, or Triton exits.

    Returns True after a requested stop, False when Triton stopped on its own. Raises
    :class:`ConfigError` before starting anything when a port is taken (:func:`check_addresses`).
    Signal handlers are installed only when called from the main thread (and restored after).
    Edits run on the service's engine thread with ``service_config.torch_threads``; load ``editor``
    with ``torch.set_num_threads(1)`` in effect, as ``gnr-fast serve`` does, so that the calling
    thread owns no OpenMP team of its own (two teams made edits about 2.5× slower on 2 cores).
    """
    require_pytriton()
    service_config = service_config or ServiceConfig()
    server_config = server_config or ServerConfig()
    check_addresses(server_config)
    prepare_environment()
    from pytriton.triton import Triton, TritonConfig

    stop = stop or threading.Event()
    service = EditService(editor, service_config)
    metrics = ServiceMetrics(service)
    triton_config = TritonConfig(
        http_address=server_config.host,
        http_port=server_config.http_port,
        grpc_address=server_config.host,
        grpc_port=server_config.grpc_port,
        metrics_address=server_config.host,
        metrics_port=server_config.metrics_port,
        allow_gpu_metrics=False,
        allow_sagemaker=False,
        allow_vertex_ai=False,
        strict_readiness=True,
        exit_timeout_secs=server_config.exit_timeout_s,
        log_verbose=server_config.log_verbose,
    )
    edit_instances = server_config.edit_instances or service_config.max_batch

    def bound_triton() -> Triton:
        triton = Triton(config=triton_config)
        triton.bind(
            model_name=EDIT_MODEL,
            infer_func=[EditModel(service, metrics) for _ in range(edit_instances)],
            inputs=_tensors(EDIT_INPUTS),
            outputs=_tensors(EDIT_OUTPUTS),
            config=model_config(service_config),
            strict=True,
        )
        triton.bind(
            model_name=INVERT_MODEL,
            infer_func=[InvertModel(service, metrics) for _ in range(server_config.invert_instances)],
            inputs=_tensors(INVERT_INPUTS),
            outputs=_tensors(INVERT_OUTPUTS),
            config=model_config(service_config),
            strict=True,
        )
        return triton

    previous = _install_signal_handlers(stop)
    service.start()
    triton = None
    endpoint = None
    try:
        if server_config.service_metrics_port is not None:
            endpoint = MetricsEndpoint(metrics, server_config.host, server_config.service_metrics_port)
        triton = start_triton(bound_triton)
        logger.info("serving %s and %s on %s", EDIT_MODEL, INVERT_MODEL, server_config.host)
        if on_ready is not None:
            on_ready(server_config)
        while not stop.wait(1.0):
            if not triton.is_alive():
                logger.error("Triton Inference Server stopped unexpectedly")
                return False
        return True
    finally:
        service.begin_shutdown()  # requests Triton hands over from now on: "shutting down"
        if triton is not None:
            triton.stop()  # SIGINT to tritonserver: it finishes the requests in flight, then exits
        service.close()
        if endpoint is not None:
            endpoint.close()
        _restore_signal_handlers(previous)


def is_instance_handshake_failure(error: BaseException) -> bool:
    """Whether Triton failed to load a model because a pytriton proxy instance missed its handshake.

    Triton initialises the instances of a Python-backend model in parallel. In pytriton 0.7.0 the
    first instance serves the model's configuration on a Unix socket and the others poll for that
    socket file for one second, then connect: they fail with ``TimeoutError`` when the first
    instance is slower than that, and with ``ConnectionRefusedError`` when they connect between its
    ``bind`` and ``listen``. Either way the load error names ``get_config_from_handshake_server``,
    and a fresh start loads the model.
    """
    return "get_config_from_handshake_server" in str(error)


def start_triton(make: Callable[[], Any], attempts: int = START_ATTEMPTS) -> Any:
    """Run the Triton that ``make`` returns (models bound, not yet run) and return it.

    A start that fails on the instance handshake race (:func:`is_instance_handshake_failure`) is
    stopped and retried with a fresh Triton from ``make``, up to ``attempts`` starts in all; any
    other error, or the race's error on the last attempt, is raised after stopping that Triton.
    """
    attempt = 1
    while True:
        triton = make()
        try:
            triton.run()
            return triton
        except Exception as error:
            triton.stop()
            if attempt >= attempts or not is_instance_handshake_failure(error):
                raise
        attempt += 1
        logger.warning(
            "Triton failed to load a model instance (pytriton's handshake race between instances); "
            "restarting it (attempt %d of %d)", attempt, attempts,
        )


def _install_signal_handlers(stop: threading.Event) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
