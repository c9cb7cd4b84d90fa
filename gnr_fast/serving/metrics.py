"""The edit service's Prometheus metrics, on an endpoint of our own (``--service-metrics-port``).

Triton's own metrics endpoint (``--metrics-port``) counts requests, queue time and failures per
model, but knows nothing of the inversion cache, the service's batches or the phases of an edit.
Triton's custom-metrics API (``MetricFamily``) exists only inside a Python-backend stub
(``triton_python_backend_utils``); pytriton 0.7.0 runs our model callables in the server's own
process and exposes no such API there, so these metrics are served by ``prometheus_client`` on a
port of their own (text format, ``GET /metrics``), per model (label ``model``):

=======================================  =========  ==================================================
metric                                   type       meaning
=======================================  =========  ==================================================
``gnr_requests_served_total``            counter    requests answered with a result (edits, inversions)
``gnr_cache_hits_total``                 counter    requests whose inversion came from the cache
``gnr_cache_misses_total``               counter    requests whose inversion was computed
``gnr_requests_refused_total``           counter    requests answered with an error, by ``reason``
``gnr_requests_in_flight``               gauge      requests a model instance holds now (queued or running)
``gnr_batch_size``                       histogram  edits sharing the UNet calls of a served edit;
                                                    images inverted together for a computed inversion
``gnr_phase_seconds``                    histogram  time per ``phase``: queue, inversion (misses only),
                                                    editing, decode (edits only)
``gnr_cache_bytes`` / ``_entries``       gauge      what the (shared) inversion cache holds now
``gnr_cache_max_bytes``                  gauge      its budget (``--cache-mb``)
``gnr_queue_depth``                      gauge      jobs waiting for the engine thread
=======================================  =========  ==================================================

Refusal reasons: ``busy`` (the service's queue is full), ``shutting_down``, ``timeout``,
``invalid`` (:class:`~gnr_fast.errors.InputError` / :class:`~gnr_fast.errors.ConfigError`),
``failed`` (any other library error: non-finite guidance, out of memory) and ``error`` (a bug).
Requests Triton itself refuses before a model instance sees them (its queue policy: "Exceeds
maximum queue size", "Request timeout expired") never reach the service; Triton's metrics count
them (``nv_inference_request_failure``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import (
    ConfigError,
    GnrError,
    InputError,
    RequestTimeoutError,
    ServiceBusyError,
    ServiceShuttingDownError,
)

if TYPE_CHECKING:
    from .service import EditService, Job, Outcome

logger = logging.getLogger(__name__)

REFUSAL_REASONS: tuple[tuple[type[BaseException], str], ...] = (  # most specific first
    (ServiceShuttingDownError, "shutting_down"),
    (RequestTimeoutError, "timeout"),
    (ServiceBusyError, "busy"),
    (InputError, "invalid"),
    (ConfigError, "invalid"),
    (GnrError, "failed"),
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 600)


def refusal_reason(error: BaseException) -> str:
    """The ``reason`` label of a request answered with ``error``."""
    return next((reason for cls, reason in REFUSAL_REASONS if isinstance(error, cls)), "error")


class ServiceMetrics:
    """The metrics of one :class:`~gnr_fast.serving.service.EditService`, in a registry of their own."""

    def __init__(self, service: "EditService") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.served = Counter("gnr_requests_served", "Requests answered with a result", ["model"], registry=registry)
        self.hits = Counter("gnr_cache_hits", "Requests whose inversion came from the cache", ["model"], registry=registry)
        self.misses = Counter("gnr_cache_misses", "Requests whose inversion was computed", ["model"], registry=registry)
        self.refused = Counter(
            "gnr_requests_refused", "Requests answered with an error, by reason", ["model", "reason"], registry=registry
        )
        self.in_flight = Gauge(
            "gnr_requests_in_flight", "Requests a model instance holds now (queued or running)", ["model"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "gnr_batch_size", "Edits sharing a served edit's UNet calls; images inverted together for a computed inversion",
            ["model"], buckets=BATCH_BUCKETS, registry=registry,
        )
        self.phase = Histogram(
            "gnr_phase_seconds", "Seconds per phase of a served request", ["model", "phase"],
            buckets=PHASE_BUCKETS, registry=registry,
        )
        cache = service.cache
        Gauge("gnr_cache_bytes", "Bytes the inversion cache holds", registry=registry).set_function(
            lambda: cache.stats().nbytes
        )
        Gauge("gnr_cache_entries", "Inversions the cache holds", registry=registry).set_function(
            lambda: cache.stats().entries
        )
        Gauge("gnr_cache_max_bytes", "The inversion cache's budget in bytes", registry=registry).set(cache.max_bytes)
        Gauge("gnr_queue_depth", "Jobs waiting for the engine thread", registry=registry).set_function(
            lambda: service.queue_depth
        )

    def record_served(self, model: str, job: "Job", outcome: "Outcome") -> None:
        """Count one request answered with ``outcome``."""
        self.served.labels(model).inc()
        (self.hits if outcome.cache_hit else self.misses).labels(model).inc()
        self.phase.labels(model, "queue").observe(outcome.queue_s)
        if not outcome.cache_hit:
            self.phase.labels(model, "inversion").observe(outcome.inversion_s)
        if outcome.result is not None:
            self.batch_size.labels(model).observe(outcome.result.batch_size)
            self.phase.labels(model, "editing").observe(outcome.result.timings.editing_s)
            self.phase.labels(model, "decode").observe(outcome.result.timings.decoding_s)
        elif not outcome.cache_hit:
            self.batch_size.labels(model).observe(outcome.inversion_batch)

    def record_refused(self, model: str, error: BaseException) -> None:
        """Count one request answered with ``error``."""
        self.refused.labels(model, refusal_reason(error)).inc()

    def text(self) -> bytes:
        """The metrics in Prometheus text format (what the endpoint serves)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsEndpoint:
    """``GET /metrics`` of a :class:`ServiceMetrics` on ``host:port`` (a daemon thread), until :meth:`close`."""

    def __init__(self, metrics: ServiceMetrics, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        logger.info("service metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
