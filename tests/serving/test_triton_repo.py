"""`gnr-fast export triton-repo`, run by the standalone tritonserver bundled in the pytriton wheel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from gnr_fast import InputError
from gnr_fast.cli import main
from gnr_fast.serving.service import encode_png

STEPS = 4
SOURCE = "a red circle"
CALL_TIMEOUT_S = 120.0


def _png(seed: int) -> bytes:
    return encode_png(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)))


def _export(model, out, *extra: str) -> int:
    return main(["export", "triton-repo", "--model", str(model), "--out", str(out), "--steps", str(STEPS),
                 "--max-batch", "4", "--max-queue-delay-ms", "200", "--instances", "1", "--torch-threads", "1", *extra])


def test_export_writes_a_python_backend_repository(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "repo"
    assert _export(tiny_model_path, out) == 0
    config = (out / "gnr_edit" / "config.pbtxt").read_text()
    for expected in ('name: "gnr_edit"', 'backend: "python"', "max_batch_size: 4", "max_queue_delay_microseconds: 200000",
                     "instance_group [ { count: 1 kind: KIND_CPU } ]", f'string_value: "{tiny_model_path.resolve()}"',
                     '{ name: "steps" data_type: TYPE_INT32 dims: [ 1 ] optional: true }'):
        assert expected in config
    assert "TritonPythonModel" in (out / "gnr_edit" / "1" / "model.py").read_text()
    capsys.readouterr()
    assert _export(tiny_model_path, out) == 2  # exists: refused without --force
    assert "--force" in capsys.readouterr().err
    assert _export(tiny_model_path, out, "--force") == 0
    assert _export(tmp_path, tmp_path / "other") == 2  # not a diffusers pipeline
    assert "model_index.json" in capsys.readouterr().err


@pytest.mark.server
def test_standalone_tritonserver_serves_the_repository(tiny_model_path, tiny_editor, tmp_path):
    from servers import ServerProcess, free_ports, port_open

    from gnr_fast.client import GnrClient
    from gnr_fast.serving.launcher import tritonserver_command

    repo = tmp_path / "repo"
    assert _export(tiny_model_path, repo) == 0
    http, grpc, metrics = free_ports(3)
    argv, env = tritonserver_command(repo, tmp_path / "work", http_port=http, grpc_port=grpc, metrics_port=metrics,
                                     exit_timeout_s=10)
    process = ServerProcess(argv, log=tmp_path / "tritonserver.log", env=env)
    try:
        with GnrClient(f"127.0.0.1:{http}", timeout_s=CALL_TIMEOUT_S) as client:
            process.wait_ready(client, "gnr_edit")
            # round trip equals a local edit; a repeat edit hits the instance's cache
            remote, info = client.edit(_png(1), SOURCE, "a green square", steps=STEPS)
            local = tiny_editor.edit(_png(1), "a green square", source_prompt=SOURCE, num_steps=STEPS, progress=False)
            diff = np.abs(np.asarray(remote, np.int16) - np.asarray(local.image, np.int16))
            assert diff.max() <= 1 and diff.mean() < 0.01
            assert info["cache_hit"] is False
            assert client.edit(_png(1), SOURCE, "a blue square", steps=STEPS)[1]["cache_hit"] is True
            # a bad request gets its own clean error
            with pytest.raises(InputError, match="cannot read image bytes") as caught:
                client.edit(b"junk", SOURCE, "a square", steps=STEPS)
            assert "Traceback" not in str(caught.value)

        # concurrent requests: Triton's dynamic batcher hands them to one execute, and they share UNet calls
        infos, errors = [], []

        def worker(seed: int) -> None:
            try:
                with GnrClient(f"grpc://127.0.0.1:{grpc}", timeout_s=CALL_TIMEOUT_S) as c:
                    infos.append(c.edit(_png(seed), SOURCE, f"target {seed}", steps=STEPS)[1])
            except BaseException as exc:  # surfaced by the assertions below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(10, 14)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        assert len(infos) == 4 and max(i["batch_size"] for i in infos) > 1
    finally:
        code = process.stop()
    assert code == 0, process.tail()
    assert not port_open(http)
