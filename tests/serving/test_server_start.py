"""Starting Triton: taken ports are refused up front; a model load that hits pytriton's
instance-handshake race is retried, nothing else is."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import pytest
from servers import free_ports

from gnr_fast import ConfigError
from gnr_fast.cli import main
from gnr_fast.serving.server import ServerConfig, check_addresses, is_instance_handshake_failure, serve, start_triton
from gnr_fast.serving.service import ServiceConfig

# The two forms of the load error, as Triton reports them (abridged from a CI log and a local run).
REFUSED = (
    "[400] load failed for model 'gnr_edit': version 1 is at UNAVAILABLE state: Internal: TritonModelException: "
    "Model initialize error: Traceback (most recent call last):\n  File \"/tmp/folderSLyJYn/1/model.py\", line 425, "
    "in initialize\n    inference_handler_config = get_config_from_handshake_server(handshake_socket)\n"
    "  File \"/tmp/folderSLyJYn/1/communication.py\", line 550, in get_config_from_handshake_server\n"
    "    sock.connect(socket_path.as_posix())\nConnectionRefusedError: [Errno 111] Connection refused"
)
TIMED_OUT = (
    "[400] load failed for model 'gnr_edit': Internal: TritonModelException: Model initialize error: "
    "File \"/tmp/folderoPEr9j/1/communication.py\", line 546, in get_config_from_handshake_server\n"
    "TimeoutError: Timeout occurred while waiting for config file /root/.cache/pytriton/workspace_b/gnr_edit-config.sock"
)
OTHER = "[400] load failed for model 'gnr_edit': Internal: ModuleNotFoundError: No module named 'torch'"


class LoadError(Exception):
    """Stands in for tritonclient's InferenceServerException (its str() carries Triton's message)."""


class FakeTriton:
    """Records what serve() binds; run() raises the next scripted load error, or starts."""

    def __init__(self, errors: list[str], made: list[FakeTriton]) -> None:
        self.errors, self.bound, self.runs, self.stopped = errors, {}, 0, False
        made.append(self)

    def bind(self, model_name: str, infer_func: list, **_: object) -> None:
        self.bound[model_name] = len(infer_func)

    def run(self) -> None:
        self.runs += 1
        if self.errors:
            raise LoadError(self.errors.pop(0))

    def is_alive(self) -> bool:
        return True

    def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize("message", [REFUSED, TIMED_OUT])
def test_both_forms_of_the_race_are_recognised(message):
    assert is_instance_handshake_failure(LoadError(message))
    assert not is_instance_handshake_failure(LoadError(OTHER))


def test_a_start_that_hits_the_race_is_retried_with_a_fresh_triton(caplog):
    errors, made = [REFUSED, TIMED_OUT], []
    with caplog.at_level(logging.WARNING, logger="gnr_fast.serving.server"):
        triton = start_triton(lambda: FakeTriton(errors, made), attempts=3)
    assert triton is made[2] and [t.runs for t in made] == [1, 1, 1]
    assert [t.stopped for t in made] == [True, True, False]  # failed starts are cleaned up, the live one is not
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and "(attempt 2 of 3)" in messages[0] and "(attempt 3 of 3)" in messages[1]


def test_other_load_errors_are_raised_at_once():
    made = []
    with pytest.raises(LoadError, match="No module named 'torch'"):
        start_triton(lambda: FakeTriton([OTHER, OTHER], made), attempts=3)
    assert len(made) == 1 and made[0].stopped


def test_the_race_error_is_raised_after_the_last_attempt():
    made = []
    with pytest.raises(LoadError, match="Connection refused"):
        start_triton(lambda: FakeTriton([REFUSED] * 3, made), attempts=3)
    assert len(made) == 3 and all(t.stopped for t in made)


def test_serve_binds_both_models_again_on_the_retry(tiny_editor, monkeypatch):
    import pytriton.triton

    errors, made = [REFUSED], []
    monkeypatch.setattr(pytriton.triton, "Triton", lambda config: FakeTriton(errors, made))
    stop = threading.Event()
    served = serve(tiny_editor, ServiceConfig(max_batch=3), ServerConfig(invert_instances=2), stop=stop,
                   on_ready=lambda _: stop.set())
    assert served is True
    assert [t.bound for t in made] == [{"gnr_edit": 3, "gnr_invert": 2}] * 2
    assert [t.stopped for t in made] == [True, True]  # the second one by serve() on the requested stop


@pytest.fixture
def taken_port():
    """A port on 127.0.0.1 another process (here: a socket) listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_taken_port_is_refused_before_triton_starts(tiny_editor, taken_port, monkeypatch):
    grpc, metrics = free_ports(2)
    config = ServerConfig(grpc_port=taken_port, http_port=grpc, metrics_port=metrics)
    expected = f"cannot serve grpc on 127.0.0.1:{taken_port}: address already in use"
    with pytest.raises(ConfigError, match=expected):
        check_addresses(config)
    import pytriton.triton

    made = []
    monkeypatch.setattr(pytriton.triton, "Triton", lambda config: FakeTriton([], made))
    with pytest.raises(ConfigError, match=expected):
        serve(tiny_editor, ServiceConfig(), config)
    assert made == []
    http, grpc, metrics = free_ports(3)
    check_addresses(ServerConfig(http_port=http, grpc_port=grpc, metrics_port=metrics))  # free ports pass


def test_an_address_of_another_machine_is_refused():
    nonlocal_bind = Path("/proc/sys/net/ipv4/ip_nonlocal_bind")
    if nonlocal_bind.exists() and nonlocal_bind.read_text().strip() != "0":
        pytest.skip("this machine lets sockets bind addresses it does not have (net.ipv4.ip_nonlocal_bind)")
    with pytest.raises(ConfigError, match="cannot serve http on 192.0.2.1:8000: cannot assign requested address"):
        check_addresses(ServerConfig(host="192.0.2.1"))  # TEST-NET-1: never an address of this machine


def test_cli_serve_on_a_taken_port_fails_with_a_message(taken_port, capsys):
    grpc, metrics = free_ports(2)
    code = main(["serve", "--http-port", str(taken_port), "--grpc-port", str(grpc), "--metrics-port", str(metrics)])
    assert code == 2
    assert f"cannot serve http on 127.0.0.1:{taken_port}: address already in use" in capsys.readouterr().err


def test_cli_serve_loads_the_model_on_one_thread_and_edits_on_the_requested_ones(monkeypatch, tiny_model_path):
    import torch

    import gnr_fast.serving.server as server_module

    seen = {}

    def fake_serve(editor, service_config, server_config, on_ready=None):
        seen["threads here"], seen["service threads"] = torch.get_num_threads(), service_config.torch_threads
        return True

    monkeypatch.setattr(server_module, "serve", fake_serve)
    previous = torch.get_num_threads()
    http, grpc, metrics = free_ports(3)
    try:
        code = main(["serve", "--model", str(tiny_model_path), "--torch-threads", "2", "--http-port", str(http),
                     "--grpc-port", str(grpc), "--metrics-port", str(metrics)])
    finally:
        torch.set_num_threads(previous)
    assert code == 0 and seen == {"threads here": 1, "service threads": 2}


def test_cli_serve_refuses_zero_torch_threads(capsys):
    assert main(["serve", "--torch-threads", "0"]) == 2
    assert "torch_threads must be a positive integer, got 0" in capsys.readouterr().err
