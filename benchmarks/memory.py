"""Memory probes: the largest tensor an operation allocates, and a process's peak RSS for one edit."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) produced by any op while active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.bytes:
                self.bytes, self.shape = t.numel() * t.element_size(), tuple(t.shape)
        return out


class RssSampler:
    """Samples this process's resident set size (from /proc/self/statm) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def peak_rss_mb(model: str, mode: str, steps: int, size: int, timeout: float = 1800) -> dict:
    """Run one edit of an existing inversion in a fresh process; return the RSS before it, the peak RSS
    sampled during it, and their difference (MiB)."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "--model", model, "--mode", mode, "--steps", str(steps), "--size", str(size)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1], check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("golden", "sd15", "tiny"))
    parser.add_argument("--mode", choices=("reference", "fast"))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    from benchmarks.models import EDITORS
    from PIL import Image

    editor = EDITORS[args.model]()
    image = Image.new("RGB", (args.size, args.size), (200, 40, 40))
    inversion = editor.invert(image, "a red square", num_steps=args.steps, progress=False)
    before = RssSampler.current() / 2**20
    with RssSampler() as sampler:
        editor.edit(inversion, "a green square", mode=args.mode, progress=False)
    peak = sampler.peak / 2**20
    print(json.dumps({"rss_before_edit_mb": round(before, 1), "peak_rss_mb": round(peak, 1), "edit_rss_mb": round(peak - before, 1)}))


if __name__ == "__main__":
    _main()
