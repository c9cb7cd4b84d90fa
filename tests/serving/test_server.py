"""`gnr-fast serve` on a real Triton Inference Server (127.0.0.1, ephemeral ports, stopped by PID)."""

from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from servers import ServerProcess, free_ports, port_open, serve_argv
from hostile import png_declaring, webp_declaring

from gnr_fast import ConfigError, GuidanceError, InputError
from gnr_fast.cli import main
from gnr_fast.client import GnrClient, ServerError
from gnr_fast.serving.protocol import EDIT_MODEL, INVERT_MODEL
from gnr_fast.serving.service import encode_png

pytestmark = pytest.mark.server

STEPS = 4
SOURCE = "a red circle"
CALL_TIMEOUT_S = 120.0


def _png(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return encode_png(Image.fromarray(pixels))


class Server:
    def __init__(self, process: ServerProcess, ports: list[int]) -> None:
        self.process, (self.http, self.grpc, self.metrics) = process, ports

    def client(self, protocol: str = "http") -> GnrClient:
        port = self.http if protocol == "http" else self.grpc
        return GnrClient(f"{protocol}://127.0.0.1:{port}", timeout_s=CALL_TIMEOUT_S)


def _start(model, tmp_path, *extra: str) -> Server:
    ports = free_ports(3)
    process = ServerProcess(serve_argv(model, ports, *extra), log=tmp_path / "serve.log")
    with GnrClient(f"127.0.0.1:{ports[0]}", timeout_s=10) as probe:
        process.wait_ready(probe, EDIT_MODEL)
        process.wait_ready(probe, INVERT_MODEL)
    return Server(process, ports)


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    running = _start(tiny_model_path, tmp_path_factory.mktemp("serve"), "--steps", str(STEPS), "--max-steps", "50",
                     "--max-batch", "4", "--max-queue-delay-ms", "100")
    yield running
    running.process.stop()


@pytest.fixture
def client(server):
    with server.client("http") as c:
        yield c


def _still_serving(server) -> None:
    """A good request right after: answered (from the cache, so it is quick)."""
    with server.client("http") as c:
        image, info = c.edit(_png(0), SOURCE, "a square after an error", steps=STEPS)
    assert image.size == (64, 64) and info["num_steps"] == STEPS


def test_health_readiness_and_metrics(server, client):
    assert client.is_live() and client.is_ready(EDIT_MODEL) and client.is_ready(INVERT_MODEL)
    with server.client("grpc") as grpc:
        assert grpc.is_live() and grpc.is_ready(EDIT_MODEL)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as response:
        assert b"nv_inference_request_success" in response.read()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_round_trip_equals_local_edit(server, tiny_editor, protocol):
    png = _png(11 if protocol == "http" else 12)
    with server.client(protocol) as c:
        remote, info = c.edit(png, SOURCE, "a green square", steps=STEPS)
    local = tiny_editor.edit(png, "a green square", source_prompt=SOURCE, num_steps=STEPS, progress=False)
    diff = np.abs(np.asarray(remote, np.int16) - np.asarray(local.image, np.int16))
    assert remote.size == local.image.size
    assert diff.max() <= 1 and diff.mean() < 0.01  # same arithmetic; at most a rounding flip of the uint8 output
    assert info["cache_hit"] is False and info["unet_calls"] == local.unet_calls


def test_second_edit_of_an_image_hits_the_cache(client):
    png = _png(13)
    _, first = client.edit(png, SOURCE, "a green square", steps=STEPS)
    _, second = client.edit(png, SOURCE, "a blue square", steps=STEPS)
    assert first["cache_hit"] is False and first["timings"]["inversion_s"] > 0
    assert second["cache_hit"] is True and second["timings"]["inversion_s"] == 0
    # the first edit also filled the source-pass cache: the repeat runs as many calls with fewer rows
    assert second["unet_calls"] == first["unet_calls"] and second["unet_rows"] < first["unet_rows"]
    _, other_steps = client.edit(png, SOURCE, "a blue square", steps=STEPS + 1)
    assert other_steps["cache_hit"] is False  # the steps are part of the key


def test_invert_then_edit_hits_the_cache(client):
    png = _png(14)
    assert client.invert(png, SOURCE, steps=STEPS)["cache_hit"] is False
    assert client.invert(png, SOURCE, steps=STEPS)["cache_hit"] is True
    _, info = client.edit(png, SOURCE, "a green square", steps=STEPS)
    assert info["cache_hit"] is True


BAD_REQUESTS = {
    "corrupt image bytes": (dict(image=b"\x89PNG\r\n\x1a\n garbage"), InputError, "cannot read image bytes"),
    "image too small": (dict(image=_png(1, (32, 48))), InputError, "at least 64 pixels"),
    "image too large": (dict(image=_png(1, (1100, 1000))), InputError, "above the limit"),
    "empty source prompt": (dict(source=""), InputError, "source_prompt is empty"),
    "blank target prompt": (dict(target="   "), InputError, "target_prompt is empty"),
    "overlong target prompt": (dict(target="a very long prompt " * 10), InputError, "tokens long"),
    "prompt over the character cap": (dict(target="x" * 3000), InputError, "3000 characters"),
    "bad config json": (dict(config="{'guiders': oops"), ConfigError, "not valid JSON"),
    "unknown guider": (dict(config={"guiders": [{"name": "magic"}]}), ConfigError, "guider 'magic' is unknown"),
    "zero steps": (dict(steps=0), InputError, r"steps must be an integer in \[1, 50\]"),
    "absurd steps": (dict(steps=1_000_000), InputError, "steps must be"),
    "unknown preset": (dict(preset="vivid"), ConfigError, "preset 'vivid' is unknown"),
    "decompression bomb": (dict(image=png_declaring(30000, 30000)), InputError, "pixels"),
    "webp bomb": (dict(image=webp_declaring(2000, 2000)), InputError, "above the limit"),
    "truncated image": (dict(image=_png(2)[:300]), InputError, "cannot read image bytes"),
    "tiff image": (dict(image=_png(2)[:0] + b"II*\x00" + b"\x00" * 64), InputError, "not a PNG, JPEG or WebP"),
    "NUL in prompt": (dict(target="a green\x00square"), InputError, "control character"),
    "deeply nested config": (dict(config='{"guiders": ' + "[" * 100 + "]" * 100 + "}"), ConfigError, "nests 101"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_answered_and_the_server_keeps_serving(server, client, case):
    fields, error, match = BAD_REQUESTS[case]
    with pytest.raises(error, match=match):
        client.edit(fields.get("image", _png(0)), fields.get("source", SOURCE), fields.get("target", "a square"),
                    preset=fields.get("preset"), config=fields.get("config"), steps=fields.get("steps", STEPS))
    _still_serving(server)


def test_malformed_tensors_are_answered(server):
    """Requests the typed client cannot build: a missing input, a non-UTF-8 prompt."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    def tensor(name, value):  # [batch 1, one element]: the models batch requests of one
        t = http.InferInput(name, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[value]], dtype=object))
        return t

    raw = http.InferenceServerClient(f"127.0.0.1:{server.http}", connection_timeout=30, network_timeout=CALL_TIMEOUT_S)
    try:
        with pytest.raises(InferenceServerException, match="target_prompt"):
            raw.infer(EDIT_MODEL, [tensor("image", _png(0)), tensor("source_prompt", b"x")])
        with pytest.raises(InferenceServerException, match="not valid UTF-8"):
            raw.infer(EDIT_MODEL, [tensor("image", _png(0)), tensor("source_prompt", b"x"), tensor("target_prompt", b"\xff")])
    finally:
        raw.close()
    _still_serving(server)


def test_failed_edit_is_reported(server, client):
    nan_config = {"guiders": [{"name": "cfg", "g_scale": 1e30}], "noise_rescaling_setup": {"type": "identity_rescaler"}}
    with pytest.raises(GuidanceError, match="non-finite"):
        client.edit(_png(15), SOURCE, "a green square", config=nan_config, steps=STEPS)
    _, info = client.edit(_png(15), SOURCE, "a green square", steps=STEPS)
    assert info["cache_hit"] is True  # the failed edit's inversion was kept; the edit was not retried silently


def test_concurrent_requests_are_all_answered_and_batched(server):
    results: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with server.client("http" if index % 2 else "grpc") as c:
                for j in range(2):
                    image, info = c.edit(_png(20 + index % 4), SOURCE, f"target {index}-{j}", steps=STEPS)
                    assert image.size == (64, 64)
                    results[(index, j)] = info
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "requests still unanswered after 300 s"
    assert not errors, errors
    assert len(results) == 16
    assert max(info["batch_size"] for info in results.values()) > 1  # concurrent edits shared UNet calls


def test_cli_client_edit(server, tmp_path, capsys):
    image = tmp_path / "in.png"
    image.write_bytes(_png(16))
    out = tmp_path / "out.png"
    url = f"127.0.0.1:{server.http}"
    assert main(["client", "edit", str(image), "-s", SOURCE, "-t", "a green square", "--url", url, "-o", str(out),
                 "--steps", str(STEPS), "--timeout", str(CALL_TIMEOUT_S)]) == 0
    with Image.open(out) as edited:
        assert edited.size == (64, 64)
    assert "cache miss" in capsys.readouterr().out
    assert main(["client", "edit", str(image), "-s", SOURCE, "-t", "x", "--url", url, "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gnr-fast: error: steps must be an integer") and "\n" not in err


def test_client_reports_an_unreachable_server():
    (port,) = free_ports(1)
    with GnrClient(f"127.0.0.1:{port}", timeout_s=5) as c:
        assert not c.is_live()
        with pytest.raises(ServerError, match="cannot reach"):
            c.edit(_png(0), SOURCE, "a square")


def test_sigterm_finishes_requests_in_flight_then_exits(tiny_model_path, tmp_path):
    # --exit-timeout 60 (servers.py: 10): under load (average 10 on 2 cores) the 40-step edit took
    # longer than 10 s after SIGTERM, Triton closed its connection and the test failed.
    running = _start(tiny_model_path, tmp_path, "--steps", "40", "--max-batch", "2", "--exit-timeout", "60")
    answers: list = []

    def request() -> None:
        with running.client("http") as c:
            try:
                answers.append(c.edit(_png(30), SOURCE, "a green square"))
            except BaseException as exc:  # surfaced by the assertion below
                answers.append(exc)

    try:
        thread = threading.Thread(target=request)
        started = time.monotonic()
        thread.start()
        time.sleep(0.5)  # the 40-step edit (inversion + edit) is under way
        running.process.terminate()
        signalled_after = time.monotonic() - started
        thread.join(timeout=CALL_TIMEOUT_S)
        code = running.process.process.wait(timeout=90)
    finally:
        running.process.stop()
    assert len(answers) == 1 and not isinstance(answers[0], BaseException), answers
    assert answers[0][1]["num_steps"] == 40
    assert answers[0][1]["timings"]["total_s"] > signalled_after  # it was still running when SIGTERM came
    assert code == 0, running.process.tail()
    assert "server stopped" in running.process.tail(400)
    assert not port_open(running.http) and not port_open(running.grpc)
