"""Where a repeat edit's time goes: cProfile (cumulative and own time) and torch.profiler's op table.

Not a benchmark (no ratios): it prints shares of one repeat edit (the source pass cached), after a
warm-up first edit, for the eager or compiled runtime. Run it alone on the machine:

    OMP_NUM_THREADS=1 python benchmarks/profile_edit.py --model bundled --steps 10
    OMP_NUM_THREADS=1 python benchmarks/profile_edit.py --model golden --runtime compiled --cache-dir /tmp/inductor
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from gnr_fast import Editor
from gnr_fast.runtime import RuntimeConfig

SOURCE = "a red square on a blue background"
TARGET = "a green square on a blue background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("bundled", "golden"), default="bundled")
    parser.add_argument("--runtime", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cache-dir", help="inductor's cache folder (compiled runtime)")
    parser.add_argument("--freezing", action="store_true")
    parser.add_argument("--cpp-wrapper", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.model == "bundled":
        editor, size = Editor.from_pretrained(None), 128
    else:
        from benchmarks.models import golden_editor

        editor, size = golden_editor(), 256
    if args.runtime == "compiled":
        options = {"cache_dir": args.cache_dir, "freezing": args.freezing, "cpp_wrapper": args.cpp_wrapper}
        editor = Editor(editor.components, runtime=RuntimeConfig("compiled", "compiled", **options))

    image = Image.new("RGB", (size, size), (40, 60, 200))
    image.paste((220, 30, 30), (size // 4, size // 4, size // 2, size // 2))
    start = time.perf_counter()
    inversion = editor.invert(image, SOURCE, num_steps=args.steps, progress=False)
    editor.edit(image, TARGET, source_prompt=SOURCE, num_steps=args.steps, progress=False)
    editor.edit(inversion, TARGET, progress=False)
    print(f"warm-up (invert, first edit, repeat edit): {time.perf_counter() - start:.2f} s")

    def repeat_edit():
        return editor.edit(inversion, TARGET, progress=False)

    start = time.perf_counter()
    repeat_edit()
    print(f"repeat edit: {time.perf_counter() - start:.3f} s")
    print("calls", dict(editor.runner.calls_by_kind), "rows", dict(editor.runner.rows_by_kind))

    profiler = cProfile.Profile()
    profiler.enable()
    repeat_edit()
    profiler.disable()
    for order, lines in (("cumulative", 35), ("tottime", 25)):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(lines)
        print(out.getvalue())
    with profile(activities=[ProfilerActivity.CPU]) as ops:
        repeat_edit()
    print(ops.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
