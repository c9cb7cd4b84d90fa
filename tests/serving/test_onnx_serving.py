"""Served edits with plain UNet calls on ONNX Runtime (issue 14, item 5): the standalone
tritonserver on ``gnr-fast export triton-repo --runtime onnx``, and ``gnr-fast serve --runtime onnx``.

Each served ONNX edit is held to the local eager edit of the same request (the eager served
edit equals the local eager edit to ≤ 1 uint8 level: tests/serving/test_server.py). Measured
2026-12-02 on the tiny pipeline, 4 steps, 64² images: max |Δ| 1 level, mean 0.0006 (tritonserver)
and 0.0001 (``gnr-fast serve``) levels (ONNX ε is within ~6e-7 relative of eager:
tests/test_onnx.py). Bounds: 2 levels, mean 0.01 (≈ 10x the worst measured mean).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from servers import ServerProcess, free_ports, port_open, serve_argv

from gnr_fast.cli import main
from gnr_fast.client import GnrClient
from gnr_fast.serving.protocol import EDIT_MODEL, INVERT_MODEL
from gnr_fast.serving.service import encode_png
from gnr_fast.serving.triton_repo import ONNX_FOLDER

pytestmark = pytest.mark.server

STEPS = 4
SOURCE = "a red circle"
TARGET = "a green square"
CALL_TIMEOUT_S = 120.0
MAX_LEVELS = 2  # measured max |Δ|: see the module docstring
MEAN_LEVELS = 0.01


def _png(seed: int) -> bytes:
    return encode_png(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)))


def _assert_close_to_eager(remote: Image.Image, info: dict, tiny_editor, png: bytes) -> None:
    """Within the bound of the local eager edit, and run as runtime "onnx" runs: the source row
    in a call of its own (plain and capturing backends differ), so more UNet calls than eager."""
    local = tiny_editor.edit(png, TARGET, source_prompt=SOURCE, num_steps=STEPS, progress=False)
    diff = np.abs(np.asarray(remote, np.int16) - np.asarray(local.image, np.int16))
    print(f"served onnx vs local eager: max {diff.max()} mean {diff.mean():.4f} levels; "
          f"unet calls {info['unet_calls']} vs {local.unet_calls}")
    assert remote.size == local.image.size
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (diff.max(), diff.mean())
    assert info["cache_hit"] is False and info["unet_calls"] > local.unet_calls


def test_standalone_tritonserver_serves_an_onnx_repository(tiny_model_path, tiny_editor, tmp_path):
    from gnr_fast.serving.launcher import tritonserver_command

    repo = tmp_path / "repo"
    assert main(["export", "triton-repo", "--model", str(tiny_model_path), "--out", str(repo), "--steps", str(STEPS),
                 "--max-batch", "2", "--instances", "1", "--torch-threads", "1", "--runtime", "onnx"]) == 0
    assert (repo / EDIT_MODEL / "1" / ONNX_FOLDER / "export.json").is_file()
    http, grpc, metrics = free_ports(3)
    argv, env = tritonserver_command(repo, tmp_path / "work", http_port=http, grpc_port=grpc, metrics_port=metrics,
                                     exit_timeout_s=10)
    process = ServerProcess(argv, log=tmp_path / "tritonserver.log", env=env)
    try:
        with GnrClient(f"127.0.0.1:{http}", timeout_s=CALL_TIMEOUT_S) as client:
            process.wait_ready(client, EDIT_MODEL)
            remote, info = client.edit(_png(1), SOURCE, TARGET, steps=STEPS)
        _assert_close_to_eager(remote, info, tiny_editor, _png(1))
    finally:
        code = process.stop()
    assert code == 0, process.tail()
    assert not port_open(http)
    assert not any((repo / EDIT_MODEL / "1").glob("unet-onnx-cache/*/export.json")), "the repository's export went unused"


def test_gnr_fast_serve_runtime_onnx(tiny_model_path, tiny_editor, tmp_path):
    ports = free_ports(3)
    cache = tmp_path / "cache"
    env = dict(os.environ, GNR_FAST_CACHE=str(cache))  # the lazy export goes here, not into ~/.cache
    process = ServerProcess(serve_argv(tiny_model_path, ports, "--steps", str(STEPS), "--runtime", "onnx"),
                            log=tmp_path / "serve.log", env=env)
    try:
        with GnrClient(f"127.0.0.1:{ports[0]}", timeout_s=CALL_TIMEOUT_S) as client:
            process.wait_ready(client, EDIT_MODEL)
            process.wait_ready(client, INVERT_MODEL)
            remote, info = client.edit(_png(2), SOURCE, TARGET, steps=STEPS)
        _assert_close_to_eager(remote, info, tiny_editor, _png(2))
    finally:
        code = process.stop()
    assert code == 0, process.tail()
    assert any((cache / "onnx").glob("*/export.json")), "the server's plain calls did not use a lazy ONNX export"
