"""Load test of ``gnr-fast serve`` (issue 5): K concurrent clients × M edits on 127.0.0.1.

For each server setting (with batching: ``--max-batch B``; without: ``--max-batch 1``) it starts a
real server on ephemeral loopback ports, sends K×M edits from K client threads (a pool of K images,
so every image is edited M times with different targets: the first edit of an image inverts it,
the others hit the inversion cache), and reports requests/s, p50/p95/p99 latency, errors and the
cache hit rate. It then measures first-edit vs repeat-edit latency on an idle server (fresh images,
one request at a time). The request count and the wall time are bounded; servers are stopped by
PID. Runs on the bundled model when present, else on the tiny random pipeline of the tests.

    python benchmarks/bench_server_load.py --clients 4 --edits 3 --rounds 3 --write   # -> benchmarks/results/server_load.md
    python -m pytest benchmarks/bench_server_load.py -s -m server --rounds 3          # same, as a pytest run
    python benchmarks/bench_server_load.py --clients 2 --edits 1 --rounds 2 --steps 2 --repeats 1 --size 64  # smoke
    python benchmarks/bench_server_load.py --runtimes eager compiled --warmup-rounds 1 --timeout 1200 ...  # compiled too

All settings' servers run side by side; after a warm-up edit on each (and ``--warmup-rounds``
untimed load rounds: a compiled server compiles one graph set per batch size it meets), the load
rounds alternate the settings (A B, B A, …) with fresh images each round, and the table gives
requests/s and latencies as the median (min–max) of the rounds. ``--runtimes eager compiled`` runs
each batching setting once per runtime (``gnr-fast serve --runtime``), side by side.

Needs ``pip install "gnr-fast[serve]"``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from gnr_fast.config import PRESET_NAMES

ROOT = Path(__file__).resolve().parents[1]
README = Path(__file__).with_name("README_server.md")
RESULT = Path(__file__).parent / "results" / "server_load.md"  # the generated section; README_server.md is curated
BUNDLED = ROOT / "gnr_fast" / "models" / "shapes-v1"
SOURCE = "a photo of shapes"


@dataclass
class LoadResult:
    setting: str
    clients: int
    edits: int
    wall_s: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hits: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    @property
    def requests_per_s(self) -> float:
        return self.answered / self.wall_s if self.wall_s else 0.0

    def row(self) -> str:
        rps = self.requests_per_s
        hit_rate = self.hits / self.answered if self.answered else 0.0
        mean_batch = statistics.fmean(self.batch_sizes) if self.batch_sizes else 0.0
        return (
            f"| {self.setting} | {self.clients}×{self.edits} | {self.answered} | {len(self.errors)} | {rps:.2f} | "
            f"{self.percentile(50):.2f} | {self.percentile(95):.2f} | {self.percentile(99):.2f} | "
            f"{hit_rate:.0%} | {mean_batch:.2f} |"
        )


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def shape_images(count: int, size: int, seed: int) -> list[bytes]:
    from PIL import Image, ImageDraw

    from gnr_fast.serving.service import encode_png

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
            r = int(rng.integers(size // 8, size // 4))
            draw.ellipse((x, y, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        images.append(encode_png(image))
    return images


class Server:
    """``gnr-fast serve`` in a subprocess of its own session, on fresh loopback ports; stopped by PID."""

    def __init__(self, model: Path, log: Path, max_batch: int, steps: int, threads: int | None,
                 runtime: str = "eager") -> None:
        self.http, self.grpc, self.metrics, self.service_metrics = free_ports(4)
        argv = [
            sys.executable, "-m", "gnr_fast.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
            "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
            "--service-metrics-port", str(self.service_metrics),
            "--max-batch", str(max_batch), "--steps", str(steps), "--exit-timeout", "10", "--runtime", runtime,
        ]
        env = dict(os.environ)
        if threads is not None:  # else the server's default
            argv += ["--torch-threads", str(threads)]
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.log = log

    def wait_ready(self, timeout_s: float) -> None:
        from gnr_fast.client import GnrClient

        deadline = time.monotonic() + timeout_s
        with GnrClient(f"127.0.0.1:{self.http}", timeout_s=10) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited while starting; see {self.log}")
                if client.is_ready("gnr_edit") and client.is_ready("gnr_invert"):
                    return
                time.sleep(0.5)
        raise RuntimeError(f"server not ready within {timeout_s}s; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def run_load(server: Server, setting: str, clients: int, edits: int, images: list[bytes], deadline: float,
             timeout_s: float, preset: str) -> LoadResult:
    """K client threads × M edits each; client k edits image (k + j) mod K with its own targets."""
    from gnr_fast.client import GnrClient

    result = LoadResult(setting, clients, edits, wall_s=0.0)
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        with GnrClient(f"127.0.0.1:{server.http}", timeout_s=timeout_s) as client:
            for j in range(edits):
                if time.monotonic() > deadline:
                    with lock:
                        result.errors.append("not sent: time budget exhausted")
                    continue
                start = time.perf_counter()
                try:
                    _, info = client.edit(images[(k + j) % len(images)], SOURCE, f"shapes, edit {k}-{j}", preset=preset)
                except Exception as exc:  # counted and reported: the benchmark requires 0
                    with lock:
                        result.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    result.latencies.append(time.perf_counter() - start)
                    result.hits += bool(info["cache_hit"])
                    result.batch_sizes.append(int(info["batch_size"]))

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + timeout_s))
    result.wall_s = time.perf_counter() - start
    unfinished = sum(t.is_alive() for t in threads)
    result.errors += [f"client thread {i} unfinished" for i in range(unfinished)]
    return result


def first_vs_repeat(server: Server, images: list[bytes], timeout_s: float, preset: str) -> tuple[list[float], list[float]]:
    """Sequential first edits (cache miss) and repeat edits (hit, other target) of fresh images."""
    from gnr_fast.client import GnrClient

    firsts, repeats = [], []
    with GnrClient(f"127.0.0.1:{server.http}", timeout_s=timeout_s) as client:
        for i, image in enumerate(images):
            for target, out in ((f"first {i}", firsts), (f"repeat {i}", repeats)):
                start = time.perf_counter()
                _, info = client.edit(image, SOURCE, target, preset=preset)
                out.append(time.perf_counter() - start)
                assert info["cache_hit"] == (out is repeats), info
    return firsts, repeats


def model_folder(explicit: str | None, workdir: Path) -> tuple[Path, str, int]:
    """(model folder, description, image size): --model, the bundled model, or the tiny pipeline."""
    if explicit:
        return Path(explicit), f"`{explicit}`", 256
    if (BUNDLED / "model_index.json").is_file():
        return BUNDLED, "bundled `shapes-v1`", 256
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(workdir / "tiny-sd"), "tiny random pipeline (tests/tiny_pipeline.py; bundled model absent)", 64


def summary_row(setting: str, results: list[LoadResult]) -> str:
    """One table row for a setting over its rounds: requests/s and latency as median (min–max) of the rounds."""

    def spread(values: list[float], fmt: str = ".2f") -> str:
        if len(values) == 1:
            return format(values[0], fmt)
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"

    answered = sum(r.answered for r in results)
    hits = sum(r.hits for r in results)
    batches = [b for r in results for b in r.batch_sizes]
    return (
        f"| {setting} | {len(results)} × {results[0].clients}×{results[0].edits} | {answered} | "
        f"{sum(len(r.errors) for r in results)} | {spread([r.requests_per_s for r in results])} | "
        f"{spread([r.percentile(50) for r in results])} | {spread([r.percentile(95) for r in results])} | "
        f"{spread([r.percentile(99) for r in results])} | {hits / answered if answered else 0.0:.0%} | "
        f"{statistics.fmean(batches) if batches else 0.0:.2f} |"
    )


@dataclass
class Report:
    rows: dict[str, list[LoadResult]]  # setting -> one LoadResult per round
    firsts: list[float]
    repeats: list[float]
    markdown: str

    @property
    def repeat_speedup(self) -> float:
        return statistics.median(self.firsts) / statistics.median(self.repeats)


def _spread_s(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def run(args: argparse.Namespace, command: str) -> Report:
    """Both settings' servers up at once, each warmed up, then ``args.rounds`` load rounds alternating
    the settings (A B, B A, …) with fresh images each round; then first vs repeat edits (alternated
    per image) on the batching server. Returns the measurements and the markdown report."""
    from gnr_fast.client import GnrClient

    budget_end = time.monotonic() + args.time_budget
    settings = [
        (f"{name}, {runtime}" if len(args.runtimes) > 1 else name, max_batch, runtime)
        for runtime in args.runtimes
        for name, max_batch in ((f"batching (max batch {args.max_batch})", args.max_batch), ("no batching", 1))
    ]
    with tempfile.TemporaryDirectory(prefix="gnr-load-") as tmp:
        workdir = Path(tmp)
        model, description, size = model_folder(args.model, workdir)
        size = args.size or size
        rows: dict[str, list[LoadResult]] = {setting: [] for setting, _, _ in settings}
        servers = {}
        try:
            for index, (setting, max_batch, runtime) in enumerate(settings):
                servers[setting] = Server(model, workdir / f"serve-{index}.log", max_batch, args.steps, args.threads,
                                          runtime)
            for setting, server in servers.items():
                server.wait_ready(timeout_s=180)
                with GnrClient(f"127.0.0.1:{server.http}", timeout_s=args.timeout) as client:
                    for w in range(args.warmup):  # first-call overheads out of the measurement
                        client.edit(shape_images(1, size, seed=900 + w)[0], SOURCE, "warm-up", preset=args.preset)
            for w in range(args.warmup_rounds):  # untimed, so each batch size a round meets is compiled
                images = shape_images(args.clients, size, seed=800 + w)
                for setting, _, _ in settings:
                    result = run_load(servers[setting], setting, args.clients, args.edits, images, budget_end,
                                      args.timeout, args.preset)
                    print(f"warm-up round {w + 1}: " + result.row(), flush=True)
            for r in range(args.rounds):
                images = shape_images(args.clients, size, seed=100 + r)  # fresh each round, the same for both settings
                for setting, _, _ in settings if r % 2 == 0 else reversed(settings):
                    result = run_load(servers[setting], setting, args.clients, args.edits, images, budget_end,
                                      args.timeout, args.preset)
                    rows[setting].append(result)
                    print(f"round {r + 1}: " + result.row(), flush=True)
                    for error in result.errors[:5]:
                        print("  error:", error, flush=True)
            firsts, repeats = first_vs_repeat(servers[settings[0][0]], shape_images(args.repeats, size, seed=1234),
                                              args.timeout, args.preset)
        finally:
            for server in servers.values():
                server.stop()
    import torch

    ratio = statistics.median(firsts) / statistics.median(repeats)
    ratio_line = (
        f"First edit vs repeat edit of the same image (sequential, {args.repeats} fresh images, each first edit "
        f"followed by its repeat, batching server): first {_spread_s(firsts)}, repeat {_spread_s(repeats)} "
        f"(median (min–max)) — **repeat is {ratio:.2f}× faster** (ratio of medians; target ≥ 1.5×)."
    )
    print(ratio_line, flush=True)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    threads = args.threads if args.threads is not None else f"the default ({torch.get_num_threads()})"
    header = (
        "| setting | rounds × clients×edits | answered | errors | requests/s | p50 s | p95 s | p99 s | cache hit rate "
        "| mean batch |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    return Report(rows, firsts, repeats, "\n".join([
        "# Server load benchmark (issue 5)",
        "",
        (
            f"Measured {date} with `{command}` on {platform.machine()} / {os.cpu_count()} CPU cores "
            f"(1-minute load average at the end {os.getloadavg()[0]:.1f}), "
            f"torch {torch.__version__}, {threads} torch thread(s) in the server, no GPU; model: {description}, "
            f"{size}×{size} images, {args.steps} DDIM steps, {args.preset} preset, runtime(s) {', '.join(args.runtimes)}, "
            f"HTTP on 127.0.0.1. All servers run side by side, each warmed up with {args.warmup} edit(s) and "
            f"{args.warmup_rounds} untimed load round(s); the {args.rounds} load rounds alternate the settings "
            "(A B, B A, …), each round with fresh images. Each client edits the images of the round's pool in turn "
            "(different targets), so the first edit of each image inverts it and later ones hit the inversion cache. "
            "Latency is client-side, per request; requests/s and latencies are the median (min–max) of the rounds."
        ),
        "",
        header,
        *[summary_row(setting, results) for setting, results in rows.items()],
        "",
        ratio_line,
        "",
    ]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: bundled model, else tiny pipeline)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients K (default 4)")
    parser.add_argument("--edits", type=int, default=5, help="edits per client M (default 5)")
    parser.add_argument("--max-batch", type=int, default=4, help="max batch of the batching server (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--preset", default="nonstyle", choices=PRESET_NAMES, help="edit preset (default nonstyle)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: 256 for real models, 64 tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh images for first-vs-repeat (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="load rounds per setting, alternated (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up edits per server (default 1)")
    parser.add_argument("--warmup-rounds", type=int, default=0,
                        help="untimed load rounds per server after the warm-up edits (default 0; 1 for compiled servers)")
    parser.add_argument("--runtimes", nargs="+", default=["eager"], choices=("eager", "compiled"),
                        help="gnr-fast serve --runtime of the servers, each batching setting once per runtime "
                             "(default eager)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the server (default: the server's default, torch's thread count)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s (default 300)")
    parser.add_argument("--time-budget", type=float, default=900.0, help="no request is sent after this, s (default 900)")
    parser.add_argument("--write", action="store_true", help=f"also write the report to {RESULT}")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds * args.clients * args.edits <= 1000:
        parser.error("rounds × clients × edits must be in [1, 1000]")
    if args.rounds < 1 or args.warmup < 0 or args.warmup_rounds < 0 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1, --warmup and --warmup-rounds >= 0")
    if len(set(args.runtimes)) != len(args.runtimes):
        parser.error("--runtimes lists a runtime twice")
    return args


@pytest.mark.server
def test_server_load(record, rounds, warmup):
    """pytest entry (``-m server``): a small load; the table gets seconds per request (wall / answered, so
    its ratio is the throughput gain of batching) and first vs repeat edit latency (no batching = reference)."""
    pytest.importorskip("pytriton", reason='needs pip install "gnr-fast[serve]"')
    from benchmarks.alternating import Samples

    argv = ["--clients", "4", "--edits", "3", "--steps", "20", "--repeats", "2", "--rounds", str(rounds),
            "--warmup", str(warmup)]
    report = run(parse_args(argv), command="python -m pytest benchmarks/bench_server_load.py -m server -s")
    print(report.markdown)
    batched, unbatched = report.rows.values()
    assert not any(r.errors for r in (*batched, *unbatched)), [r.errors for r in (*batched, *unbatched)]
    for mode, results in (("reference", unbatched), ("fast", batched)):
        per_request = Samples([r.wall_s / r.answered for r in results])
        record("server load: wall s per request (1 / requests/s)", mode, samples=per_request,
               **{f"requests_per_s_{mode}": [round(r.requests_per_s, 3) for r in results]})
    record("server: first vs repeat edit", "reference", samples=Samples(report.firsts))
    record("server: first vs repeat edit", "fast", samples=Samples(report.repeats))


if __name__ == "__main__":
    arguments = parse_args()
    text = run(arguments, command=" ".join(["python benchmarks/bench_server_load.py", *sys.argv[1:]])).markdown
    print(text)
    if arguments.write:
        RESULT.parent.mkdir(exist_ok=True)
        RESULT.write_text(text)
        print(f"wrote {RESULT} (copy its table into {README.name})")
