"""Soak (issue 17): K clients × M edits on the bundled model, new and repeated images mixed, the
server's memory (RSS of its whole process tree: our process, tritonserver, the Python-backend
stubs) sampled once a second. After warm-up RSS must stay within the inversion-cache budget plus
a stated margin: memory does not grow per request.

Slow (minutes): `GNR_SOAK_CLIENTS=4 GNR_SOAK_EDITS=25 pytest -m slow tests/serving/test_soak.py -s`.
It prints one table row for benchmarks/README_reliability.md.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from servers import ServerProcess, free_ports, serve_argv

from gnr_fast.client import GnrClient
from gnr_fast.errors import ServiceBusyError
from gnr_fast.serving.protocol import EDIT_MODEL, INVERT_MODEL
from gnr_fast.serving.service import encode_png

pytestmark = [pytest.mark.server, pytest.mark.slow]

BUNDLED = Path(__file__).resolve().parents[2] / "gnr_fast" / "models" / "shapes-v1"
CLIENTS = int(os.environ.get("GNR_SOAK_CLIENTS", "4"))
EDITS = int(os.environ.get("GNR_SOAK_EDITS", "25"))
STEPS = int(os.environ.get("GNR_SOAK_STEPS", "10"))
CACHE_MB = 16  # small, so that new images evict old inversions during the soak
MARGIN_MB = 64  # allocator slack and Triton's buffers on top of the cache budget
WARMUP_FRACTION = 0.2  # requests answered before RSS sampling counts


def _png(seed: int) -> bytes:
    from PIL import Image

    return encode_png(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (128, 128, 3), dtype=np.uint8)))


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MB (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            with open(f"/proc/{current}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total / 1024**2


def test_soak_memory_stays_within_the_cache_budget(tmp_path):
    ports = free_ports(3)
    process = ServerProcess(
        serve_argv(BUNDLED, ports, "--steps", str(STEPS), "--cache-mb", str(CACHE_MB), "--max-batch", "4"),
        log=tmp_path / "serve.log",
    )
    samples: list[tuple[int, float]] = []  # (requests answered so far, RSS MB)
    latencies: list[float] = []
    counts = {"sent": 0, "completed": 0, "refused": 0, "failed": 0}
    lock, done = threading.Lock(), threading.Event()
    try:
        with GnrClient(f"127.0.0.1:{ports[0]}", timeout_s=10) as probe:
            process.wait_ready(probe, EDIT_MODEL)
            process.wait_ready(probe, INVERT_MODEL)

        def sampler() -> None:
            while not done.wait(1.0):
                with lock:
                    answered = counts["completed"] + counts["refused"] + counts["failed"]
                samples.append((answered, tree_rss_mb(process.pid)))

        def client(k: int) -> None:
            with GnrClient(f"{'http' if k % 2 else 'grpc'}://127.0.0.1:{ports[0] if k % 2 else ports[1]}",
                           timeout_s=300) as c:
                for j in range(EDITS):
                    # every third edit a new image, otherwise one of four repeated ones
                    seed = 10_000 + k * EDITS + j if j % 3 == 0 else j % 4
                    with lock:
                        counts["sent"] += 1
                    started = time.monotonic()
                    try:
                        c.edit(_png(seed), "a red circle", f"a blue square {j}", steps=STEPS)
                        kind = "completed"
                    except ServiceBusyError:
                        kind = "refused"
                    except Exception:  # noqa: BLE001 - counted; the assertion below names it
                        kind = "failed"
                    with lock:
                        counts[kind] += 1
                        if kind == "completed":
                            latencies.append(time.monotonic() - started)

        watcher = threading.Thread(target=sampler, daemon=True)
        watcher.start()
        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=3600)
        wall_s = time.monotonic() - started
        done.set()
        watcher.join(timeout=5)
    finally:
        assert process.stop() == 0, process.tail()
    total = CLIENTS * EDITS
    warm = [rss for answered, rss in samples if answered >= WARMUP_FRACTION * total]
    assert warm, samples
    baseline, peak, final = warm[0], max(warm), warm[-1]
    p50 = statistics.median(latencies)
    p99 = sorted(latencies)[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\nsoak | {CLIENTS}x{EDITS} edits, {STEPS} steps, bundled 128² | {counts['completed'] / wall_s:.3f} req/s | "
          f"p50 {p50:.2f} s, p99 {p99:.2f} s | sent {counts['sent']}, completed {counts['completed']}, refused "
          f"{counts['refused']}, failed {counts['failed']}, lost {counts['sent'] - counts['completed'] - counts['refused'] - counts['failed']} | "
          f"RSS after warm-up {baseline:.0f} MB, peak {peak:.0f} MB, final {final:.0f} MB, drift {final - baseline:+.0f} MB")
    assert counts["sent"] == total and counts["failed"] == 0 and counts["completed"] + counts["refused"] == total
    assert peak - baseline <= CACHE_MB + MARGIN_MB, (baseline, peak, samples)
