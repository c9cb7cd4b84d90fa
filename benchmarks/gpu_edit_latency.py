"""Eager vs compiled latency of one 512² edit on SD 1.5's architecture (random weights), for
``benchmarks/gpu_check.sh``.

For each runtime (``eager``, ``compiled``): a first invert + edit (for ``compiled`` this includes
inductor's cold compile, into ``--cache``), then ``--rounds`` timed rounds, synchronised, whose
median and min–max go to ``--out`` as JSON. Random weights say nothing about quality; the numbers
are only about speed. ``--device cpu --size 64 --steps 2 --rounds 1`` is a smoke run of the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def edit_seconds(editor, image, steps: int, device: str) -> float:
    """Wall-clock seconds of one invert + edit (synchronised on CUDA)."""
    start = time.perf_counter()
    inversion = editor.invert(image, "a red circle on a blue background", num_steps=steps, progress=False)
    editor.edit(inversion, "a green circle on a blue background", preset="nonstyle", progress=False)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    from benchmarks.gpu_precision_check import make_editor
    from gnr_fast import Editor
    from gnr_shapes.evaluation.cases import make_case
    from gnr_fast.runtime import RuntimeConfig

    image = make_case("colour", 9_000_000, size=args.size).source.image
    base = make_editor("sd15-random", args.device, getattr(torch, args.dtype))
    report: dict = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device,
                    "torch": torch.__version__, "dtype": args.dtype, "size": args.size, "steps": args.steps,
                    "rounds": args.rounds, "runtimes": {}}
    for name in ("eager", "compiled"):
        runtime = RuntimeConfig.preset(name)
        if name == "compiled":
            runtime = runtime.with_cache_dir(args.cache)
        editor = Editor(base.components, runtime=runtime)
        first = edit_seconds(editor, image, args.steps, args.device)
        times = [edit_seconds(editor, image, args.steps, args.device) for _ in range(args.rounds)]
        report["runtimes"][name] = {"first_s": round(first, 3), "median_s": round(statistics.median(times), 3),
                                    "min_s": round(min(times), 3), "max_s": round(max(times), 3)}
        print(json.dumps({name: report["runtimes"][name]}), flush=True)
    eager, compiled = report["runtimes"]["eager"], report["runtimes"]["compiled"]
    report["eager_over_compiled"] = round(eager["median_s"] / compiled["median_s"], 3)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default="inductor-cache", help="inductor cache folder of the compiled runtime")
    parser.add_argument("--out", required=True, help="the JSON report's path")
    args = parser.parse_args()
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
