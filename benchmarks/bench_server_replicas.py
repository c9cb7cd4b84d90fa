"""Replicas behind nginx (issue 37): 1 vs 2 vs 3 ``gnr-fast serve`` replicas on 127.0.0.1, round-robin
vs image-affine routing — repeat-edit cache hit rate, p50/p99 latency, requests/s, CPU per replica.

For each replica count it starts the replicas (``--torch-threads`` each, ephemeral loopback ports)
and two nginx balancers in front of them (``gnr_fast.serving.balancer``: ``affine`` hashes the
client's route key, ``round_robin`` does not), warms every replica up with one edit, then runs one
load per policy (alternating the policy order per replica count) with fresh images: K clients, each
owning its own images and editing each of them E times in a row (other targets), with a random
pause (``--jitter-ms``) before each request so that the clients do not move in lockstep (in
lockstep, K clients over N replicas with N dividing K would meet the same replica every time under
round-robin too). The first edit of an image inverts it; the E − 1 repeats hit the cache only where
they meet the replica that inverted it. CPU per replica is the CPU time of the replica's process group (server, tritonserver, Python
stubs) during the load, as a share of the machine (cores × wall). Servers and balancers are
stopped by PID; the request count and the wall time are bounded.

    python benchmarks/bench_server_replicas.py --replicas 1 2 3 --write    # -> benchmarks/results/server_replicas.md
    python benchmarks/bench_server_replicas.py --replicas 1 2 --clients 2 --images-per-client 1 --edits-per-image 2 --steps 2 --size 64  # smoke

Needs ``pip install "gnr-fast[serve]"`` and nginx (``apt-get install nginx-light``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from benchmarks.bench_server_load import SOURCE, Server, free_ports, model_folder, shape_images  # noqa: E402
from gnr_fast.config import PRESET_NAMES  # noqa: E402
from gnr_fast.serving.balancer import POLICIES, BalancerConfig, Nginx  # noqa: E402

RESULT = Path(__file__).parent / "results" / "server_replicas.md"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    replicas: int
    policy: str
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    repeats: int = 0
    repeat_hits: int = 0
    cpu_s: list[float] = field(default_factory=list)  # per replica, during the load

    def row(self, cores: int) -> str:
        answered = len(self.latencies)
        p50, p99 = (float(np.percentile(self.latencies, q)) for q in (50, 99)) if answered else (float("nan"),) * 2
        shares = " / ".join(f"{cpu / (self.wall_s * cores):.0%}" for cpu in self.cpu_s)
        hit_rate = self.repeat_hits / self.repeats if self.repeats else float("nan")
        return (
            f"| {self.replicas} | {self.policy} | {answered} | {len(self.errors)} | {answered / self.wall_s:.2f} | "
            f"{p50:.2f} | {p99:.2f} | {hit_rate:.0%} ({self.repeat_hits}/{self.repeats}) | {shares} |"
        )


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes of process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we read
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... utime(12) stime(13)
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def run_load(url: str, load: Load, clients: int, images: list[list[bytes]], edits_per_image: int, steps: int,
             preset: str, timeout_s: float, deadline: float, jitter_s: float, seed: int) -> None:
    """``clients`` threads; client k edits each of ``images[k]`` ``edits_per_image`` times in a row,
    pausing a uniform random 0–``jitter_s`` before each request (latency counts from the send)."""
    from gnr_fast.client import GnrClient

    lock = threading.Lock()

    def client_loop(k: int) -> None:
        pauses = np.random.default_rng(seed + k)
        with GnrClient(url, timeout_s=timeout_s, affinity=True) as client:
            for i, image in enumerate(images[k]):
                for e in range(edits_per_image):
                    time.sleep(float(pauses.uniform(0.0, jitter_s)))
                    if time.monotonic() > deadline:
                        with lock:
                            load.errors.append("not sent: time budget exhausted")
                        continue
                    start = time.perf_counter()
                    try:
                        _, info = client.edit(image, SOURCE, f"shapes, edit {k}-{i}-{e}", preset=preset, steps=steps)
                    except Exception as exc:  # counted and reported
                        with lock:
                            load.errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    with lock:
                        load.latencies.append(time.perf_counter() - start)
                        if e > 0:
                            load.repeats += 1
                            load.repeat_hits += bool(info["cache_hit"])

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + timeout_s))
    load.wall_s = time.perf_counter() - start
    load.errors += ["client thread unfinished"] * sum(t.is_alive() for t in threads)


def measure(args: argparse.Namespace, workdir: Path, model: Path, size: int, count: int, seed: int,
            deadline: float) -> list[Load]:
    """``count`` replicas behind both balancers: one load per policy."""
    from gnr_fast.client import GnrClient

    replicas = [Server(model, workdir / f"replica-{count}-{i}.log", args.max_batch, args.steps, args.threads)
                for i in range(count)]
    balancers: dict[str, Nginx] = {}
    try:
        for replica in replicas:
            try:
                replica.wait_ready(timeout_s=300)
            except RuntimeError:  # its log lives in the temporary directory: show it before it goes
                print(replica.log.read_text(errors="replace")[-3000:], file=sys.stderr)
                raise
            with GnrClient(f"127.0.0.1:{replica.http}", timeout_s=args.timeout) as client:  # warm-up
                client.edit(shape_images(1, size, seed=9000 + seed)[0], SOURCE, "warm-up", steps=args.steps)
        for policy in POLICIES:
            http, grpc = free_ports(2)
            balancers[policy] = Nginx(BalancerConfig(
                http_upstreams=tuple(f"127.0.0.1:{r.http}" for r in replicas), http_port=http, grpc_port=grpc,
                policy=policy, workdir=workdir / f"nginx-{count}-{policy}",
            ))
            balancers[policy].wait_listening()
        loads = []
        order = POLICIES if count % 2 else tuple(reversed(POLICIES))
        for p, policy in enumerate(order):
            pool = shape_images(args.clients * args.images_per_client, size, seed=seed + 100 * p)  # fresh images
            images = [pool[k::args.clients] for k in range(args.clients)]
            load = Load(count, policy)
            before = [group_cpu_s(r.process.pid) for r in replicas]
            run_load(balancers[policy].http_url, load, args.clients, images, args.edits_per_image, args.steps,
                     args.preset, args.timeout, deadline, args.jitter_ms / 1000, seed=seed + 100 * p)
            load.cpu_s = [group_cpu_s(r.process.pid) - b for r, b in zip(replicas, before)]
            print(load.row(os.cpu_count() or 1), flush=True)
            for error in load.errors[:3]:
                print("  error:", error, flush=True)
            loads.append(load)
        return sorted(loads, key=lambda load: POLICIES.index(load.policy))
    finally:
        for balancer in balancers.values():
            balancer.stop()
        for replica in replicas:
            replica.stop()


def run(args: argparse.Namespace, command: str) -> str:
    """All replica counts, one after the other; the markdown report."""
    import torch

    deadline = time.monotonic() + args.time_budget
    loads: list[Load] = []
    with tempfile.TemporaryDirectory(prefix="gnr-replicas-") as tmp:
        workdir = Path(tmp)
        model, description, default_size = model_folder(args.model, workdir)
        size = args.size or default_size
        for n, count in enumerate(args.replicas):
            loads += measure(args, workdir, model, size, count, seed=1000 * (n + 1), deadline=deadline)
    cores = os.cpu_count() or 1
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "# Replicas behind nginx: round-robin vs image-affine (issue 37)",
        "",
        (
            f"Measured {date} with `{command}` on {platform.machine()} / {cores} CPU cores (1-minute load average "
            f"at the end {os.getloadavg()[0]:.1f}), torch {torch.__version__}, {args.threads} torch thread(s) per "
            f"replica, no GPU; model: {description}, {size}×{size} images, {args.steps} DDIM steps, {args.preset} "
            f"preset, `--max-batch {args.max_batch}`; nginx on 127.0.0.1 (HTTP). {args.clients} clients, each "
            f"editing its own {args.images_per_client} image(s) {args.edits_per_image} times in a row, a random "
            f"0–{args.jitter_ms:g} ms pause before each request; repeat-edit "
            "hit rate = repeats answered from the replica's cache / repeats. CPU per replica = its process group's "
            f"CPU time during the load / ({cores} cores × wall)."
        ),
        "",
        "| replicas | routing | answered | errors | requests/s | p50 s | p99 s | repeat-edit hit rate | CPU per replica |",
        "|---|---|---|---|---|---|---|---|---|",
        *[load.row(cores) for load in loads],
        "",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: bundled model, else tiny pipeline)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="replica counts (default 1 2 3)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--images-per-client", type=int, default=2, help="images each client owns (default 2)")
    parser.add_argument("--edits-per-image", type=int, default=3, help="edits of each image in a row (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    parser.add_argument("--size", type=int, default=128, help="image side (default 128)")
    parser.add_argument("--max-batch", type=int, default=4, help="--max-batch of each replica (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica (default 1)")
    parser.add_argument("--jitter-ms", type=float, default=500.0,
                        help="longest random pause before each request, ms (default 500)")
    parser.add_argument("--preset", default="nonstyle", choices=PRESET_NAMES, help="edit preset (default nonstyle)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s (default 300)")
    parser.add_argument("--time-budget", type=float, default=1800.0, help="no request is sent after this, s (default 1800)")
    parser.add_argument("--write", action="store_true", help=f"also write the report to {RESULT}")
    args = parser.parse_args(argv)
    if not all(1 <= count <= 4 for count in args.replicas):
        parser.error("replica counts must be in [1, 4]")
    total = len(args.replicas) * len(POLICIES) * args.clients * args.images_per_client * args.edits_per_image
    if not 1 <= total <= 2000:
        parser.error("replica counts × 2 policies × clients × images × edits must be in [1, 2000]")
    if args.edits_per_image < 2:
        parser.error("--edits-per-image must be at least 2 (the repeats are what is measured)")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    text = run(arguments, command=" ".join(["python benchmarks/bench_server_replicas.py", *sys.argv[1:]]))
    print(text)
    if arguments.write:
        RESULT.parent.mkdir(exist_ok=True)
        RESULT.write_text(text)
