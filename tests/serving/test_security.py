"""Security defaults (issue 17) that need no server: no pickle on any input path, loopback by
default, a size limit on every server input. (The server-side checks — repository API refused,
listening sockets on 127.0.0.1 — are in test_faults.py.)"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from gnr_fast.cli import build_parser
from gnr_fast.serving.server import ServerConfig
from gnr_fast.serving.service import MAX_CONFIG_BYTES, MAX_PROMPT_CHARS, ServiceConfig
from gnr_shapes.training.checkpoints import load_checkpoint, save_checkpoint

PACKAGE = Path(__file__).resolve().parents[2] / "gnr_fast"


def _torch_load_calls() -> list[tuple[str, int, ast.Call]]:
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls.append((str(path.relative_to(PACKAGE)), node.lineno, node))
    return calls


def test_every_torch_load_refuses_pickled_code():
    calls = _torch_load_calls()
    assert calls  # the scan sees the package's calls (checkpoints, parity)
    unsafe = [f"{path}:{line}" for path, line, call in calls
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in call.keywords)]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_no_module_unpickles_directly():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "pickle.load" in p.read_text() or "allow_pickle=True" in p.read_text()]
    assert not offenders, offenders


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/gnr-fast-pwned-by-checkpoint",))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = Path("/tmp/gnr-fast-pwned-by-checkpoint")
    marker.unlink(missing_ok=True)
    torch.save({"model": {}, "step": 1, "evil": _Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_training_checkpoint_still_round_trips(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 7, "elapsed_s": 1.5,
             "args": {"out": tmp_path, "lr": 1e-3, "resume": True, "deadline": None}, "shape": {"widths": [32, 64]}}
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert loaded["step"] == 7 and loaded["args"]["out"] == tmp_path
    assert torch.equal(loaded["model"]["weight"], net.state_dict()["weight"])
    assert loaded["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_servers_bind_loopback_by_default():
    assert ServerConfig().host == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_every_server_input_has_a_size_limit():
    config = ServiceConfig()
    assert config.max_image_bytes == 32 * 1024**2 and config.max_queue == 64 and config.max_steps == 200
    assert MAX_PROMPT_CHARS == 2000 and MAX_CONFIG_BYTES == 64 * 1024
    args = build_parser().parse_args(["serve", "--max-image-mb", "2", "--max-queue", "3", "--request-timeout", "5"])
    assert (args.max_image_mb, args.max_queue, args.request_timeout) == (2.0, 3, 5.0)
