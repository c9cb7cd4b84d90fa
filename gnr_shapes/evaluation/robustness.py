"""Prompt-robustness benchmark: the quality benchmark's held-out edits, prompted in each caption form.

The same colour / shape / background cases as :mod:`gnr_shapes.evaluation.quality` (world seeds
9,000,000 + i), but source and target prompts are written in one caption form at a time
(:data:`gnr_shapes.world.captions.CAPTION_FORMS`: ``full`` = the training grammar, then ``no_size``,
``synonym``, ``short``, ``comma``, ``plain_word``); both prompts of a case use the same form (and,
for ``synonym``, the same draw). Every form re-inverts the source with its own source prompt.
Success and kept-region PSNR/SSIM are scored exactly as in the quality benchmark.

Run::

    python -m gnr_shapes.evaluation.robustness --per-kind 50 --out benchmarks/quality

(writes ``robustness.md`` and ``robustness.json``; ``--model`` to evaluate another export).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..world.captions import CAPTION_FORMS, caption_in_form
from .cases import EDIT_KINDS, EditCase, EditKind, make_cases
from .methods import METHODS, Method
from .quality import model_size, run_case
from .metrics import finite_mean
from .report import CaseResult

DEFAULT_METHODS: tuple[str, ...] = ("baseline-cfg4", "gar-shapes")
"""The baseline at the `shapes` preset's CFG, and GaR with the bundled model's preset."""


def case_prompts(case: EditCase, form: str) -> tuple[str, str]:
    """(source, target) prompts of ``case`` in caption ``form``; ``synonym`` draws both from
    the same seeded generator, so a circle -> square edit reads e.g. "disc" -> "box"."""
    return (caption_in_form(case.source.spec, form, np.random.default_rng(case.seed)),
            caption_in_form(case.target.spec, form, np.random.default_rng(case.seed)))


def evaluate_forms(
    editor,
    judge,
    kinds: Sequence[EditKind] = EDIT_KINDS,
    per_kind: int = 50,
    num_steps: int = 50,
    methods: dict[str, Method] | None = None,
    forms: Sequence[str] = CAPTION_FORMS,
    progress: bool = True,
) -> list[CaseResult]:
    """Every method on ``per_kind`` held-out cases of each kind, once per caption form."""
    methods = methods or {m: METHODS[m] for m in DEFAULT_METHODS}
    unknown = [f for f in forms if f not in CAPTION_FORMS]
    if unknown:
        raise ValueError(f"unknown caption forms {unknown}; choose from {list(CAPTION_FORMS)}")
    cases = [case for kind in kinds for case in make_cases(kind, per_kind, size=model_size(editor))]
    results: list[CaseResult] = []
    jobs = [(case, form) for case in cases for form in forms]
    for case, form in tqdm(jobs, desc="robustness", disable=not progress):
        results.extend(run_case(editor, judge, case, num_steps, methods, case_prompts(case, form), form))
    return results


def summary_rows(results: list[CaseResult]) -> list[dict]:
    """One row per (edit kind, caption form, method): success rate, mean kept-region PSNR/SSIM,
    and the PSNR difference to the same kind and method with ``full`` captions."""
    rows = []
    for kind in dict.fromkeys(r.kind for r in results):
        for form in dict.fromkeys(r.form for r in results):
            for method in dict.fromkeys(r.method for r in results):
                group = [r for r in results if (r.kind, r.form, r.method) == (kind, form, method)]
                if group:
                    rows.append({"kind": kind, "form": form, "method": method, "n": len(group),
                                 "success": float(np.mean([r.success for r in group])),
                                 "psnr_keep_db": finite_mean([r.psnr_keep for r in group]),
                                 "ssim_keep": finite_mean([r.ssim_keep for r in group])})
    full = {(r["kind"], r["method"]): r["psnr_keep_db"] for r in rows if r["form"] == "full"}
    for r in rows:
        r["psnr_vs_full_db"] = r["psnr_keep_db"] - full.get((r["kind"], r["method"]), float("nan"))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| edit kind | caption form | method | n | success | PSNR keep (dB) | vs full (dB) | SSIM keep |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['form']} | {r['method']} | {r['n']} | {100 * r['success']:.0f} % | "
                     f"{r['psnr_keep_db']:.1f} | {r['psnr_vs_full_db']:+.1f} | {r['ssim_keep']:.3f} |")
    return "\n".join(lines)


def example_prompts(kinds: Sequence[EditKind], forms: Sequence[str], size: int) -> str:
    """One example (source -> target) per form, from the first case of the first kind."""
    case = make_cases(kinds[0], 1, size=size)[0]
    return "\n".join(f"- `{form}`: \"{s}\" → \"{t}\"" for form in forms for s, t in [case_prompts(case, form)])


def write_report(results: list[CaseResult], out: Path, command: str, examples: str, name: str) -> Path:
    """Write ``<name>.md`` (table) and ``<name>.json`` (rows and per-case numbers) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    (out / f"{name}.json").write_text(json.dumps(
        {"command": command, "rows": rows,
         "cases": [{k: v for k, v in asdict(r).items() if k != "image"} for r in results]}, indent=1))
    text = (f"# Prompt robustness on the shapes world\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d %H:%M')} UTC)\n\n"
            f"Prompts of each form (first case):\n\n{examples}\n\n{markdown_table(rows)}\n")
    path = out / f"{name}.md"
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gnr_shapes.evaluation.robustness``."""
    import sys

    import torch

    from gnr_fast.editor import Editor
    from ..world.judge import load_judge

    parser = argparse.ArgumentParser(description="prompt-robustness benchmark on the shapes world")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--per-kind", type=int, default=50, help="cases per edit kind (default 50)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--kinds", nargs="+", default=list(EDIT_KINDS), choices=EDIT_KINDS)
    parser.add_argument("--forms", nargs="+", default=list(CAPTION_FORMS), choices=CAPTION_FORMS)
    ddim_methods = [name for name, method in METHODS.items() if method.sampler == "ddim"]
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ddim_methods)
    parser.add_argument("--out", default="benchmarks/quality")
    parser.add_argument("--name", default="robustness", help="report file stem (default robustness)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    editor = Editor.from_pretrained(args.model)
    results = evaluate_forms(editor, load_judge(), args.kinds, args.per_kind, args.steps,
                             {m: METHODS[m] for m in args.methods}, args.forms)
    command = "python -m gnr_shapes.evaluation.robustness " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_report(results, Path(args.out), command, example_prompts(args.kinds, args.forms, model_size(editor)),
                        args.name)
    print(markdown_table(summary_rows(results)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
