"""Serving gnr-fast on NVIDIA Triton Inference Server (``pip install "gnr-fast[serve]"``).

* :mod:`.cache` — the byte-bounded LRU inversion cache;
* :mod:`.service` — request validation, batching queue and engine thread (transport-free);
* :mod:`.protocol` — the tensors of the ``gnr_edit`` / ``gnr_invert`` models;
* :mod:`.server` — ``gnr-fast serve`` on pytriton's bundled Triton;
* :mod:`.triton_repo` — ``gnr-fast export triton-repo``, a repository for a standalone ``tritonserver``;
* :mod:`.launcher` — the Triton process environment (the libpython pitfall) and binaries;
* :mod:`.metrics` — the service's Prometheus metrics and their endpoint (``--service-metrics-port``);
* :mod:`.routing` — the route key a load balancer hashes to send every edit of an image to one replica;
* :mod:`.balancer` — nginx in front of replicas: its configuration and a launcher.

Importing this package needs neither pytriton nor tritonclient; the modules that do check for
them and raise :class:`~gnr_fast.errors.BackendUnavailableError` naming the install command.
"""

from .cache import CacheStats, InversionCache, InversionKey, inversion_nbytes

__all__ = ["CacheStats", "InversionCache", "InversionKey", "inversion_nbytes"]
