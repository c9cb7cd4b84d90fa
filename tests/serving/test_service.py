"""The edit service without a server: validation, the batching queue, per-job errors, the protocol."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from gnr_fast import ConfigError, EditConfig, GuidanceError, InputError
from gnr_fast.cli import main
from parity import rel_err
from gnr_fast.serving import launcher
from gnr_fast.serving.protocol import (
    EDIT_INPUTS,
    bytes_tensor,
    error_line,
    parse_error,
    read_inputs,
)
from gnr_fast.serving.service import (
    EditService,
    ServiceBusyError,
    ServiceConfig,
    encode_png,
)

STEPS = 4
NAN_CONFIG = json.dumps({  # finite but absurd CFG scale: the latents overflow within two steps
    "guiders": [{"name": "cfg", "g_scale": 1e30}], "noise_rescaling_setup": {"type": "identity_rescaler"},
})


def _png(seed: int, size: int = 64) -> bytes:
    return encode_png(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)))


@pytest.fixture
def service(tiny_editor):
    svc = EditService(tiny_editor, ServiceConfig(max_batch=3, max_queue_delay_ms=200, default_steps=STEPS, max_steps=50))
    yield svc
    svc.close(timeout_s=30)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"image": b"not an image"}, InputError, "cannot read image bytes"),
        ({"image": b""}, InputError, "image is empty"),
        ({"image": _png(0, size=32)}, InputError, "at least 64"),
        ({"source_prompt": ""}, InputError, "source_prompt is empty"),
        ({"target_prompt": b"\xff\xfe"}, InputError, "not valid UTF-8"),
        ({"target_prompt": "x" * 5000}, InputError, "5000 characters"),
        ({"steps": 0}, InputError, r"steps must be an integer in \[1, 50\]"),
        ({"steps": 10**6}, InputError, "steps must be"),
        ({"preset": "vivid"}, ConfigError, "preset 'vivid' is unknown"),
        ({"config_json": "{not json"}, ConfigError, "not valid JSON"),
        ({"config_json": "[1, 2]"}, ConfigError, "JSON object"),
        ({"config_json": json.dumps({"guiders": [{"name": "magic"}]})}, ConfigError, "guider 'magic' is unknown"),
        ({"config_json": json.dumps({"guiders": [{"name": "cfg"}], "num_steps": 500})}, InputError, "at most 50"),
    ],
)
def test_bad_requests_are_refused_with_a_message(service, fields, error, match):
    request = {"image": _png(0), "source_prompt": "a red circle", "target_prompt": "a green square", **fields}
    with pytest.raises(error, match=match):
        service.edit_job(**request)


def test_overlong_prompt_is_refused_by_token_count(service):
    job = service.edit_job(_png(0), "a red circle", "a very long prompt " * 10)  # ~190 tokens, under the char cap
    (outcome,) = service.run([job])
    assert isinstance(outcome, InputError) and "tokens long" in str(outcome)


def test_queue_batches_concurrent_compatible_edits(service, tiny_editor):
    service.start()
    jobs = [service.edit_job(_png(seed), "a red circle", f"target {seed}") for seed in range(3)]
    futures = [service.submit(job) for job in jobs]
    outcomes = [f.result(timeout=120) for f in futures]
    # batch_size is what shared UNet calls: the three edits ran as one group, as many calls as one edit
    assert [o.batch_size for o in outcomes] == [3, 3, 3]
    assert all(not o.cache_hit for o in outcomes)
    singles = [tiny_editor.edit(_png(seed), f"target {seed}", source_prompt="a red circle", num_steps=STEPS,
                                progress=False) for seed in range(3)]
    assert all(o.result.unet_calls == singles[0].unet_calls for o in outcomes)
    assert all(o.result.unet_rows == 3 * singles[0].unet_rows for o in outcomes)
    for outcome, single in zip(outcomes, singles):  # every output of a shared batch equals its single edit
        # batched kernels' rounding, measured 1 thread 2026-12-07 (Xeon AVX-512): latents 1.5e-5 to 1.9e-5,
        # images 1 uint8 level, inversion latents 3.6e-6 to 5.7e-6
        assert rel_err(outcome.result.latents, single.latents) < 1e-4
        assert np.abs(np.asarray(outcome.result.image, np.int16) - np.asarray(single.image, np.int16)).max() <= 1
        assert rel_err(outcome.inversion.latents, single.inversion.latents) < 5e-5
    again = service.wait(service.edit_job(_png(1), "a red circle", "another target"))
    assert again.cache_hit and again.inversion_s == 0 and again.batch_size == 1


def test_repeat_edit_through_the_service_runs_fewer_rows_not_fewer_calls(service):
    """The inversion cache carries the source pass: a repeat edit skips its row on every guided step."""
    first = service.run([service.edit_job(_png(30), "a red circle", "a green square")])[0]
    second = service.run([service.edit_job(_png(30), "a red circle", "a blue square")])[0]
    assert not first.cache_hit and second.cache_hit
    guided = sum(EditConfig.nonstyle(STEPS).guiders[1].is_active(i) for i in range(1, STEPS))  # step 0 vanishes
    assert first.result.unet_calls == second.result.unet_calls
    assert first.result.unet_rows - second.result.unet_rows == guided > 0
    info = second.info(service.edit_job(_png(30), "a red circle", "a blue square"))
    assert info["unet_rows"] == second.result.unet_rows and info["batch_size"] == 1


def test_a_failed_edit_is_its_own_error(service):
    service.start()
    bad = service.edit_job(_png(5), "a red circle", "a green square", config_json=NAN_CONFIG)
    good = service.edit_job(_png(6), "a red circle", "a green square")
    futures = [service.submit(bad), service.submit(good)]
    with pytest.raises(GuidanceError, match="non-finite"):
        futures[0].result(timeout=120)
    assert futures[1].result(timeout=120).result is not None


def test_close_finishes_queued_jobs_then_refuses(tiny_editor):
    service = EditService(tiny_editor, ServiceConfig(max_batch=2, default_steps=STEPS))
    service.start()
    futures = [service.submit(service.edit_job(_png(seed), "a red circle", "a square")) for seed in (7, 8, 9)]
    closer = threading.Thread(target=service.close, kwargs={"timeout_s": 120})
    closer.start()
    closer.join(timeout=130)
    assert all(f.done() and f.result().result is not None for f in futures)
    with pytest.raises(ServiceBusyError, match="shutting down"):
        service.submit(service.edit_job(_png(7), "a red circle", "a square"))


def test_protocol_round_trip_of_inputs_and_errors():
    data = {"image": bytes_tensor(b"\x89PNG\x00"), "source_prompt": np.array([b"src"], dtype=object),
            "target_prompt": np.array(["trg"], dtype=object), "steps": np.array([[7]], dtype=np.int32)}
    values = read_inputs(data, EDIT_INPUTS)
    assert values == {"image": b"\x89PNG\x00", "source_prompt": b"src", "target_prompt": b"trg",
                      "preset": None, "config": None, "steps": 7}
    with pytest.raises(InputError, match="'target_prompt' is missing"):
        read_inputs({"image": data["image"], "source_prompt": data["source_prompt"]}, EDIT_INPUTS)
    with pytest.raises(InputError, match="one element"):
        read_inputs({**data, "steps": np.array([1, 2], dtype=np.int32)}, EDIT_INPUTS)
    line = error_line(InputError("image is 10x10;\nboth sides must be at least 64 pixels"))
    assert line == "gnr_fast.errors.InputError: image is 10x10; both sides must be at least 64 pixels"
    triton_text = f"Failed to process the request(s): Traceback (most recent call last):\n  File x\n{line}\n\nAt:\n  model.py(1)\n"
    assert parse_error(triton_text) == ("InputError", "image is 10x10; both sides must be at least 64 pixels")
    assert parse_error("connection reset") is None


def test_png_helper_round_trips(sample_image):
    with Image.open(io.BytesIO(encode_png(sample_image))) as decoded:
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(sample_image))


def test_serve_without_the_serve_extra_fails_fast_with_the_install_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(launcher, "installed", lambda module: module not in ("pytriton", "tritonclient"))
    assert main(["serve", "--model", str(tmp_path / "no-model-here")]) == 2  # before loading the model
    assert 'pip install "gnr-fast[serve]"' in capsys.readouterr().err


def test_triton_environment_puts_this_interpreter_first():
    import sys
    import sysconfig
    from pathlib import Path

    env = launcher.triton_environment({"LD_LIBRARY_PATH": "/opt/a:/opt/b", "PATH": "/usr/bin"})
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    libdir = launcher.interpreter_libdir()
    if libdir is None:
        pytest.skip(f"this interpreter has no shared libpython ({sysconfig.get_config_var('LDLIBRARY')})")
    assert env["LD_LIBRARY_PATH"].split(":") == [str(libdir), "/opt/a", "/opt/b"]
    again = launcher.triton_environment(env)
    assert again["LD_LIBRARY_PATH"] == env["LD_LIBRARY_PATH"]  # idempotent


def test_server_and_service_settings_are_validated():
    from gnr_fast.serving.server import ServerConfig

    with pytest.raises(ConfigError, match="must differ"):
        ServerConfig(http_port=9000, grpc_port=9000, metrics_port=9002)
    with pytest.raises(ConfigError, match="TCP port"):
        ServerConfig(http_port=70000)
    with pytest.raises(ConfigError, match="max_batch"):
        ServiceConfig(max_batch=0)
    with pytest.raises(ConfigError, match="exceeds max_steps"):
        ServiceConfig(default_steps=300, max_steps=200)


def test_new_images_in_one_batch_share_their_inversion_calls(service, tiny_editor):
    jobs = [service.edit_job(_png(20), "a red circle", "a green square"),
            service.edit_job(_png(21), "a blue square", "a red circle"),
            service.edit_job(_png(20), "a red circle", "a yellow star")]  # same image twice: one inversion
    calls = tiny_editor.runner.calls
    outcomes = service.run(jobs)
    assert [o.inversion_batch for o in outcomes] == [2, 2, 2]
    assert outcomes[0].inversion is outcomes[2].inversion and not any(o.cache_hit for o in outcomes)
    assert tiny_editor.runner.calls - calls == STEPS + outcomes[0].result.unet_calls
    single = tiny_editor.invert(_png(21), "a blue square", num_steps=STEPS, progress=False)
    assert rel_err(outcomes[1].inversion.latents, single.latents) < 5e-5  # measured 3.7e-6 (1 thread, 2026-12-07)
    assert outcomes[1].info(jobs[1])["inversion_batch"] == 2
    assert service.run([service.edit_job(_png(21), "a blue square", "a cat")])[0].cache_hit


def test_the_engine_thread_runs_with_the_configured_torch_threads(tiny_editor, monkeypatch):
    import gnr_fast.serving.service as service_module

    calls = []
    monkeypatch.setattr(service_module.torch, "set_num_threads",
                        lambda n: calls.append((threading.current_thread().name, n)))
    svc = EditService(tiny_editor, ServiceConfig(torch_threads=3))
    svc.start()
    svc.close(timeout_s=30)
    assert calls == [("gnr-engine", 3)]
    with pytest.raises(ConfigError, match="torch_threads must be a positive integer"):
        ServiceConfig(torch_threads=0)


def test_out_of_memory_in_a_batch_drops_source_caches_and_retries_singly(service, monkeypatch):
    """torch.OutOfMemoryError for the whole batch: the inversions' source caches are dropped and each
    edit runs alone; one that still does not fit is a clear error in its own slot (issue 20)."""
    import torch

    from gnr_fast.errors import DeviceOutOfMemoryError
    from gnr_fast.serving import service as service_module

    real = service_module.edit_batch
    calls: list[int] = []

    def edit_batch(editor, requests, return_exceptions=False):
        calls.append(len(requests))
        if len(requests) > 1 or requests[0].target_prompt == "too big":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(editor, requests, return_exceptions=return_exceptions)

    monkeypatch.setattr(service_module, "edit_batch", edit_batch)
    jobs = [service.edit_job(_png(seed), "a red circle", target) for seed, target in ((40, "a green square"), (41, "too big"))]
    outcomes = service.run(jobs)
    assert calls == [2, 1, 1]
    assert outcomes[0].result is not None and outcomes[0].inversion.source_cache is not None  # rebuilt by its edit
    assert isinstance(outcomes[1], DeviceOutOfMemoryError) and "'too big'" in str(outcomes[1])
