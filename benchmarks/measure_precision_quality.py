"""Edit quality of low-precision UNet calls on the bundled model (issue 14, item 4): the shapes-world
quality benchmark (:mod:`gnr_shapes.evaluation.quality`, ``gar-shapes`` method, 50 steps) run with
each precision on the same held-out cases, success and kept-region PSNR side by side.

    python benchmarks/measure_precision_quality.py --per-kind 20 --precision fp32 bf16-plain
    python benchmarks/measure_precision_quality.py --per-kind 50 --precision bf16-model   # one per process

Precisions: ``fp32``; ``bf16-plain`` (``RuntimeConfig(plain_dtype=torch.bfloat16)``: inversion and
ε_u / ε_trg under bf16 autocast, capturing and grad calls float32 — what ``plain_dtype="auto"``
chooses for SD-size UNets on CPUs with native bf16); ``bf16-model`` (UNet and text encoder in
bfloat16, ``Editor.from_pretrained(dtype=torch.bfloat16)``; latents, energies, gradients, γ and
the VAE float32). Each precision's rows are printed as a markdown table and written as JSON to
``--out`` (default ``benchmarks/results/precision_quality_<precision>.json``). Not a timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gnr_fast import Editor
from gnr_shapes.evaluation.cases import EDIT_KINDS
from gnr_shapes.evaluation.methods import METHODS
from gnr_shapes.evaluation.quality import evaluate, markdown_table, summary_rows
from gnr_fast.runtime import RuntimeConfig
from gnr_shapes.world.judge import load_judge

PRECISIONS = ("fp32", "bf16-plain", "bf16-model")


def make_editor(precision: str) -> Editor:
    if precision == "fp32":
        return Editor.from_pretrained(None, runtime=RuntimeConfig(plain_dtype=None))
    if precision == "bf16-plain":
        return Editor.from_pretrained(None, runtime=RuntimeConfig(plain_dtype=torch.bfloat16))
    return Editor.from_pretrained(None, dtype=torch.bfloat16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16-plain"], choices=PRECISIONS)
    parser.add_argument("--per-kind", type=int, default=50, help="cases per edit kind (the benchmark's standard: 50)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--method", default="gar-shapes", choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    judge = load_judge()
    for precision in args.precision:
        start = time.perf_counter()
        _, results = evaluate(make_editor(precision), judge, EDIT_KINDS, args.per_kind, args.steps,
                              {args.method: METHODS[args.method]}, progress=False)
        rows = summary_rows(results)
        print(f"\n{precision} ({args.per_kind} per kind, {args.steps} steps, {time.perf_counter() - start:.0f} s)")
        print(markdown_table(rows))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"precision_quality_{precision}.json").write_text(json.dumps(
            {"precision": precision, "per_kind": args.per_kind, "steps": args.steps, "method": args.method,
             "time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows,
             "cases": [{"kind": r.kind, "seed": r.seed, "success": r.success, "psnr_keep": r.psnr_keep} for r in results]},
            indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
