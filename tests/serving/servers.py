"""Real servers for the tests marked ``server``: ephemeral ports on 127.0.0.1, stopped by their PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 180  # model load + Triton start on a loaded 2-core machine
STOP_TIMEOUT_S = 60


def free_ports(count: int) -> list[int]:
    """``count`` distinct ephemeral TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


class ServerProcess:
    """A server subprocess in its own session, stopped by its PID (SIGTERM, then SIGKILL of its group)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, client, model: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode} while starting:\n{self.tail()}")
            if client.is_ready(model):
                return
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"the server was not ready within {timeout_s}s:\n{self.tail()}")

    def terminate(self) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM and wait; SIGKILL the process group if it does not exit in time. Returns the exit code."""
        self.terminate()
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)  # the group of the session this fixture started
            self.process.wait(timeout=30)
            return None


def serve_argv(model: Path, ports: list[int], *extra: str) -> list[str]:
    """``gnr-fast serve`` on ``ports``: http, grpc, metrics and optionally the service metrics port
    (else a free one: the CLI's default 8003 would collide between servers running side by side)."""
    if len(ports) == 3:
        ports = [*ports, next(port for port in iter(lambda: free_ports(1)[0], None) if port not in ports)]
    http, grpc, metrics, service_metrics = ports
    return [
        sys.executable, "-m", "gnr_fast.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--service-metrics-port", str(service_metrics), "--torch-threads", "1", "--exit-timeout", "10", *extra,
    ]
