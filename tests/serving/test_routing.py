"""The route key, the balancer's nginx configuration and the client's retry classification (issue 37);
no server. The nginx checks run the real ``nginx -t`` (.ci/run installs nginx-light)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gnr_fast.errors import (
    ConfigError,
    InputError,
    ReplicaUnavailableError,
    RequestTimeoutError,
    ServerError,
    ServiceBusyError,
    ServiceShuttingDownError,
)
from gnr_fast.images import prepare_image
from gnr_fast.serving.balancer import BalancerConfig, main, nginx_binary, nginx_config
from gnr_fast.serving.metrics import refusal_reason
from gnr_fast.serving.routing import ROUTE_HEADER, retry_key, route_key

ROOT = Path(__file__).resolve().parents[2]
EXPORT_NGINX = ROOT / "export" / "nginx" / "gnr-fast.conf"
EXAMPLE_ARGS = [  # how export/nginx/gnr-fast.conf was rendered (three replicas on one host)
    "--http", "127.0.0.1:8000", "127.0.0.1:8010", "127.0.0.1:8020",
    "--grpc", "127.0.0.1:8001", "127.0.0.1:8011", "127.0.0.1:8021",
    "--listen-host", "0.0.0.0",
]


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (64, 80, 3), dtype=np.uint8)


def _encode(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def test_route_key_follows_the_server_cache_key():
    pixels = _pixels(0)
    fast, small = _encode(pixels, compress_level=1), _encode(pixels, compress_level=9)
    assert fast != small  # two encodings of the same pixels ...
    assert prepare_image(fast).content_hash == prepare_image(small).content_hash  # ... one cache entry
    assert route_key(fast, "a cat", 4) == route_key(small, "a cat", 4)  # ... one route
    assert route_key(Image.fromarray(pixels), "a cat", 4) == route_key(fast, "a cat", 4)
    others = {
        route_key(_encode(_pixels(1)), "a cat", 4),  # other pixels
        route_key(fast, "a dog", 4),  # other source prompt
        route_key(fast, "a cat", 8),  # other steps
        route_key(fast, "a cat", None),  # the server's default steps
    }
    assert len(others) == 4 and route_key(fast, "a cat", 4) not in others


def test_route_key_refuses_what_the_server_refuses():
    with pytest.raises(InputError, match="cannot read image bytes"):
        route_key(_encode(_pixels(0))[:100], "a cat", 4)


def test_retry_keys_are_new_points_of_the_ring():
    key = route_key(_encode(_pixels(0)), "a cat", 4)
    assert retry_key(key, 0) == key
    assert len({retry_key(key, attempt) for attempt in range(4)}) == 4


def test_refusals_are_labelled_by_reason():
    cases = {
        ServiceShuttingDownError("x"): "shutting_down",
        RequestTimeoutError("x"): "timeout",
        ServiceBusyError("x"): "busy",
        InputError("x"): "invalid",
        ConfigError("x"): "invalid",
        ServerError("x"): "failed",
        ValueError("x"): "error",
    }
    assert {type(e).__name__: refusal_reason(e) for e in cases} == {type(e).__name__: r for e, r in cases.items()}


def test_client_maps_gateway_and_transport_failures_to_replica_unavailable():
    from gnr_fast.client import _server_error

    html = "an exception occurred in the client while decoding the response: ...\nresponse: <html>502 Bad Gateway</html>"
    assert isinstance(_server_error(html, "502", "lb:8080"), ReplicaUnavailableError)
    assert isinstance(_server_error("Socket closed", "StatusCode.UNAVAILABLE", "lb:8081"), ReplicaUnavailableError)
    assert isinstance(_server_error("Exceeds maximum queue size", "503"), ServiceBusyError)
    assert isinstance(_server_error("Request timeout expired", "400"), RequestTimeoutError)
    shutting = _server_error("boom\ngnr_fast.errors.ServiceShuttingDownError: the server is shutting down", "500")
    assert isinstance(shutting, ServiceShuttingDownError)
    assert type(_server_error("something else", "500")) is ServerError


def test_affine_config_hashes_the_route_header_consistently_and_round_robin_does_not():
    affine = nginx_config(BalancerConfig(http_upstreams=("127.0.0.1:1", "127.0.0.1:2")))
    header = "$http_" + ROUTE_HEADER.replace("-", "_")
    assert f"hash {header} consistent;" in affine
    plain = nginx_config(BalancerConfig(http_upstreams=("127.0.0.1:1", "127.0.0.1:2"), policy="round_robin"))
    assert "hash " not in plain and "server 127.0.0.1:2 " in plain
    with pytest.raises(ConfigError, match="host:port"):
        BalancerConfig(http_upstreams=("127.0.0.1:1; evil",))
    with pytest.raises(ConfigError, match="policy"):
        BalancerConfig(http_upstreams=("127.0.0.1:1",), policy="random")


def _nginx_accepts(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    return subprocess.run([str(nginx_binary()), "-t", "-q", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path),
                           "-c", str(conf)], capture_output=True, text=True)


def test_shipped_nginx_config_is_rendered_and_accepted_by_nginx(tmp_path, capsys):
    assert main(EXAMPLE_ARGS) == 0
    rendered = capsys.readouterr().out
    assert EXPORT_NGINX.read_text() == rendered, "re-render export/nginx/gnr-fast.conf (see export/nginx/README.md)"
    # nginx -t with the shipped file's pid/log paths moved into tmp_path (root-owned defaults elsewhere).
    local = nginx_config(BalancerConfig(
        http_upstreams=("127.0.0.1:8000", "127.0.0.1:8010"), grpc_upstreams=("127.0.0.1:8001",), workdir=tmp_path,
    ))
    checked = _nginx_accepts(local, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_client_command_takes_the_replica_options():
    from gnr_fast.cli import build_parser

    args = build_parser().parse_args(["client", "edit", "in.png", "-s", "a", "-t", "b", "--url", "http://lb:8080",
                                      "--affinity", "--retries", "2", "--failover", "http://r1:8000", "http://r2:8000"])
    assert (args.affinity, args.retries, args.failover) == (True, 2, ["http://r1:8000", "http://r2:8000"])
    serve = build_parser().parse_args(["serve", "--service-metrics-port", "0"])
    assert serve.service_metrics_port == 0  # off
