"""An nginx load balancer in front of ``gnr-fast serve`` replicas: its configuration and a launcher.

Why nginx: it is in Debian's archive (``apt-get install nginx-light``, 1.22 on bookworm), so the
tests and benchmarks start the real balancer on loopback; its ``hash <key> consistent`` upstream
(ketama) hashes any request header, HTTP/1.1 and gRPC (``grpc_pass`` over HTTP/2) alike, and when
a replica dies only that replica's keys move. Envoy's ``ring_hash`` does the same but is not packaged
by Debian.

:func:`nginx_config` renders one configuration: an HTTP listener and (optionally) a gRPC listener,
each proxying to an upstream group of replicas, ``policy="affine"`` (hash of the
:data:`~gnr_fast.serving.routing.ROUTE_HEADER` header; requests without it, such as health checks,
go round-robin) or ``policy="round_robin"``. A replica that refuses connections is skipped for
``fail_timeout_s`` and its keys go to the next replica of the ring; a request already sent to a
replica that dies is answered 502 (nginx does not re-send a POST), which the client's ``retries``
handle (:class:`~gnr_fast.client.GnrClient`). Each response names the replica that answered in
the ``X-Gnr-Replica`` header. The files under ``export/nginx`` and the Kubernetes ConfigMap
(``export/kubernetes``) are rendered by this function (``python -m gnr_fast.serving.balancer``).

:class:`Nginx` runs ``nginx`` in the foreground with such a configuration, in a work directory of
its own (pid, logs, temp files), stopped by its PID.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from ..errors import BackendUnavailableError, ConfigError, ServerError
from .routing import ROUTE_HEADER

logger = logging.getLogger(__name__)

Policy = Literal["affine", "round_robin"]
POLICIES: tuple[str, ...] = ("affine", "round_robin")
NGINX_INSTALL = "apt-get install nginx-light (Debian/Ubuntu), or any nginx >= 1.22 with the http_v2 and grpc modules"
REPLICA_HEADER = "X-Gnr-Replica"


@dataclass(frozen=True)
class BalancerConfig:
    """What the balancer listens on and which replicas it spreads requests over.

    ``http_upstreams`` / ``grpc_upstreams`` are ``host:port`` of the replicas' Triton HTTP / gRPC
    endpoints (no gRPC listener when empty). ``resolve`` marks upstream names re-resolved at run time
    through ``resolver`` (nginx >= 1.27.3; Kubernetes headless Services), ``workdir`` holds the pid
    file, logs and temp files (None: nginx's defaults, for a container image).
    """

    http_upstreams: tuple[str, ...]
    grpc_upstreams: tuple[str, ...] = ()
    listen_host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081
    policy: Policy = "affine"
    fail_timeout_s: int = 10
    timeout_s: int = 600  # longest request (an edit waiting in a queue)
    max_body_mb: int = 64  # encoded image + prompts (the server refuses over --max-image-mb, 32)
    workdir: Path | None = None
    resolve: bool = False
    resolver: str = "kube-dns.kube-system.svc.cluster.local"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"balancer policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if not self.http_upstreams:
            raise ConfigError("the balancer needs at least one replica (http_upstreams)")
        for address in (*self.http_upstreams, *self.grpc_upstreams):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or any(c in address for c in " ;{}#\n'\""):
                raise ConfigError(f"replica address {address!r} is not host:port")


def nginx_config(config: BalancerConfig) -> str:
    """The nginx configuration (``nginx.conf``) of ``config``."""
    header_var = "$http_" + ROUTE_HEADER.replace("-", "_")
    balance = f"        hash {header_var} consistent;\n" if config.policy == "affine" else ""
    resolve = " resolve" if config.resolve else ""
    zone = "        zone {name} 64k;\n" if config.resolve else ""

    def upstream(name: str, servers: Sequence[str]) -> str:
        lines = "".join(
            f"        server {address} max_fails=1 fail_timeout={config.fail_timeout_s}s{resolve};\n" for address in servers
        )
        return f"    upstream {name} {{\n{balance}{zone.format(name=name)}{lines}    }}\n"

    if config.workdir is not None:
        work = Path(config.workdir).resolve()
        # Workers run as this user (nginx would drop a root master's workers to "nobody", who may
        # not write the work directory's temp files); a non-root nginx ignores the line.
        user = pwd.getpwuid(os.geteuid()).pw_name
        main = f"user {user};\npid {work}/nginx.pid;\nerror_log {work}/error.log warn;\n"
        temp = "".join(
            f"    {kind}_temp_path {work}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        access = f"    access_log {work}/access.log gnr;\n"
    else:
        main, temp, access = "", "", "    access_log /dev/stdout gnr;\n"
    resolver = f"    resolver {config.resolver} valid=10s;\n" if config.resolve else ""
    timeout = f"{config.timeout_s}s"
    text = (
        "# gnr-fast balancer (issue 37), rendered by gnr_fast.serving.balancer.nginx_config: do not edit by hand.\n"
        f"# policy: {config.policy}" + (f" (hash of the {ROUTE_HEADER} header, consistent)" if config.policy == "affine" else "")
        + "\n"
        "worker_processes 1;\n"
        "daemon off;\n"
        f"{main}"
        "events {\n    worker_connections 1024;\n}\n"
        "http {\n"
        f"{temp}"
        f"    log_format gnr '$remote_addr \"$request\" $status {header_var} -> $upstream_addr $request_time';\n"
        f"{access}"
        f"{resolver}"
        f"    client_max_body_size {config.max_body_mb}m;\n"
        f"{upstream('gnr_http', config.http_upstreams)}"
        "    server {\n"
        f"        listen {config.listen_host}:{config.http_port};\n"
        "        location / {\n"
        "            proxy_pass http://gnr_http;\n"
        "            proxy_http_version 1.1;\n"
        "            proxy_set_header Connection \"\";\n"
        "            proxy_request_buffering on;\n"
        "            proxy_next_upstream error timeout;\n"
        f"            proxy_connect_timeout 5s;\n"
        f"            proxy_read_timeout {timeout};\n"
        f"            proxy_send_timeout {timeout};\n"
        f"            add_header {REPLICA_HEADER} $upstream_addr always;\n"
        "        }\n"
        "    }\n"
    )
    if config.grpc_upstreams:
        text += (
            f"{upstream('gnr_grpc', config.grpc_upstreams)}"
            "    server {\n"
            f"        listen {config.listen_host}:{config.grpc_port} http2;\n"
            "        location / {\n"
            "            grpc_pass grpc://gnr_grpc;\n"
            "            grpc_next_upstream error timeout;\n"
            "            grpc_connect_timeout 5s;\n"
            f"            grpc_read_timeout {timeout};\n"
            f"            grpc_send_timeout {timeout};\n"
            "        }\n"
            "    }\n"
        )
    return text + "}\n"


def nginx_binary() -> Path:
    """The ``nginx`` executable on PATH (or /usr/sbin); raises :class:`BackendUnavailableError` naming the install."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BackendUnavailableError(f"the load balancer needs nginx; install it with {NGINX_INSTALL}")
    return Path(found)


class Nginx:
    """``nginx`` in the foreground with :func:`nginx_config` of ``config`` (whose ``workdir`` it needs),
    in a session of its own; :meth:`stop` ends it by its PID."""

    def __init__(self, config: BalancerConfig) -> None:
        if config.workdir is None:
            raise ConfigError("a launched balancer needs a workdir for its pid file, logs and temp files")
        self.config = config
        self.workdir = Path(config.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "nginx.conf"
        self.conf.write_text(nginx_config(config))
        binary = nginx_binary()
        check = subprocess.run(
            [str(binary), "-t", "-q", "-e", str(self.workdir / "error.log"), "-p", str(self.workdir), "-c", str(self.conf)],
            capture_output=True, text=True,
        )
        if check.returncode != 0:
            raise ConfigError(f"nginx refused the balancer configuration {self.conf}: {check.stderr.strip()}")
        self.log = self.workdir / "nginx.out"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [str(binary), "-e", str(self.workdir / "error.log"), "-p", str(self.workdir), "-c", str(self.conf)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def http_url(self) -> str:
        return f"http://{self.config.listen_host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.config.listen_host}:{self.config.grpc_port}"

    def wait_listening(self, timeout_s: float = 30.0) -> None:
        """Return once the HTTP (and gRPC) listener accepts connections; raise :class:`ServerError` if nginx exits."""
        ports = [self.config.http_port] + ([self.config.grpc_port] if self.config.grpc_upstreams else [])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"nginx exited with {self.process.returncode}: {self.error_log()}")
            if all(_accepts(self.config.listen_host, port) for port in ports):
                return
            time.sleep(0.1)
        raise ServerError(f"nginx did not listen on {self.config.listen_host}:{ports} within {timeout_s:g}s")

    def error_log(self) -> str:
        paths = [self.log, self.workdir / "error.log"]
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in paths if p.exists())

    def access_log(self) -> list[str]:
        path = self.workdir / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGQUIT (graceful: in-flight requests finish) and wait; SIGKILL the group after ``timeout_s``."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGQUIT)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)  # the session this launcher started: master and worker
            self.process.wait(timeout=10)
            return None

    def __enter__(self) -> "Nginx":
        return self

    def __exit__(self, *_) -> None:
        self.stop()


def _accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def main(argv: Sequence[str] | None = None) -> int:
    """Print the nginx configuration for the replicas named on the command line."""
    parser = argparse.ArgumentParser(prog="python -m gnr_fast.serving.balancer", description=__doc__.splitlines()[0])
    parser.add_argument("--http", nargs="+", required=True, metavar="HOST:PORT", help="replicas' Triton HTTP endpoints")
    parser.add_argument("--grpc", nargs="*", default=[], metavar="HOST:PORT", help="replicas' Triton gRPC endpoints")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=8081)
    parser.add_argument("--policy", choices=POLICIES, default="affine")
    parser.add_argument("--resolve", action="store_true", help="re-resolve replica names at run time (nginx >= 1.27.3)")
    parser.add_argument("--resolver", default=BalancerConfig.resolver)
    args = parser.parse_args(argv)
    config = BalancerConfig(
        http_upstreams=tuple(args.http), grpc_upstreams=tuple(args.grpc), listen_host=args.listen_host,
        http_port=args.http_port, grpc_port=args.grpc_port, policy=args.policy, resolve=args.resolve,
        resolver=args.resolver,
    )
    sys.stdout.write(nginx_config(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
