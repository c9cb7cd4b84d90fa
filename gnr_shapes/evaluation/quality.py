"""The edit-quality benchmark (issues 4 and 35): GaR vs "DDIM inversion + CFG" on held-out
shapes-world edits, and the quality/latency frontier of DDIM and consistency-model edits.

Every method (:mod:`gnr_shapes.evaluation.methods`) edits every case. DDIM methods of one step
count share one inversion of the source; consistency methods edit as first edits (inversion
included). A method succeeds when the judge reads the target's attributes from the edited image
(the edited one changed, the others kept; object size is not judged). Preservation is measured on
the region that should not change (known from the world's masks): PSNR, SSIM, and a judge-feature
perceptual distance. With ``reconstruct`` each inversion is also regenerated under the source
prompt without guidance, and the PSNR of that reconstruction against the source is recorded.

Run: ``gnr-fast eval --per-kind 50 --out benchmarks/quality`` (writes ``results.md``, ``grid.png``
and ``results.json``); ``gnr-fast eval --frontier ...`` (writes ``frontier.md``, ``frontier.json``,
``frontier.png`` and ``frontier_grid.png``, :mod:`gnr_shapes.evaluation.frontier`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gnr_fast.config import EditConfig
from gnr_fast.errors import ConfigError
from gnr_fast.outputs import check_writable_dir
from ..world.judge import attributes_of
from .cases import EDIT_KINDS, EditCase, EditKind, make_case, make_cases
from .methods import (
    DEFAULT_METHODS,
    FRONTIER_METHODS,
    METHODS,
    ConsistencyEditors,
    ConsistencyOptions,
    Method,
    load_consistency_editors,
    method_config,
    reconstruction_config,
)
from .metrics import feature_distance, finite_mean, masked_psnr, masked_ssim
from .report import CaseResult, case_records, picture_grid


def judge_success(judge, edited: np.ndarray, case: EditCase) -> bool:
    """The judge reads the target scene's attributes (object sizes excepted) from ``edited``."""
    predicted = judge.predict(edited[None])[0]
    truth = attributes_of(case.target.spec)
    fields = ("background_kind", "background_colours", "main_shape", "main_colour", "second_shape", "second_colour")
    return all(getattr(predicted, f) == getattr(truth, f) for f in fields)


def score(judge, case: EditCase, image: np.ndarray, **labels) -> CaseResult:
    """``image`` (uint8 [H, W, 3]) as an edit of ``case``: judged, and compared with the source on the kept region."""
    return CaseResult(
        kind=case.kind,
        seed=case.seed,
        success=judge_success(judge, image, case),
        psnr_keep=masked_psnr(image, case.source.image, case.keep_mask),
        ssim_keep=masked_ssim(image, case.source.image, case.keep_mask),
        perceptual=feature_distance(judge, image, case.source.image),
        image=image,
        **labels,
    )


def reconstruction_psnr(image: np.ndarray, case: EditCase) -> float:
    """PSNR (dB) of a reconstruction of ``case``'s source over the whole image."""
    return masked_psnr(image, case.source.image, np.ones(image.shape[:2], bool))


def run_case(editor, judge, case: EditCase, num_steps: int, methods: dict[str, Method],
             prompts: tuple[str, str] | None = None, form: str = "full",
             consistency: ConsistencyEditors | None = None, reconstruct: bool = False) -> list[CaseResult]:
    """Edit ``case`` with every method and score each edit, in the order of ``methods``.

    The methods of one sampler and step count share one inversion of the source (timed): DDIM
    methods with ``editor`` (a DDIM :class:`~gnr_fast.Editor`), consistency methods with
    ``consistency``'s editor for their step count. ``reconstruct`` also regenerates each inversion
    under the source prompt (:func:`~gnr_shapes.evaluation.methods.reconstruction_config`) and
    records its PSNR. ``prompts`` (source, target) replaces the scenes' grammar captions (the
    prompt-robustness benchmark writes them in other forms); ``form`` labels the results.
    """
    groups: dict[tuple[str, int], dict[str, Method]] = {}
    for name, method in methods.items():
        groups.setdefault((method.sampler, method.num_steps(num_steps)), {})[name] = method
    results: dict[str, CaseResult] = {}
    for (sampler, steps), members in groups.items():
        if sampler == "ddim":
            results |= _edit_group(editor, judge, case, sampler, steps, members, prompts, form, None, reconstruct)
        elif consistency is None or steps not in consistency.editors:
            raise ConfigError(f"methods {list(members)} need a consistency editor for {steps} steps")
        else:
            results |= _edit_group(consistency.editors[steps], judge, case, sampler, steps, members, prompts, form,
                                   consistency.preset, reconstruct)
    return [results[name] for name in methods]


def _edit_group(editor, judge, case: EditCase, sampler: str, steps: int, methods: dict[str, Method],
                prompts: tuple[str, str] | None, form: str, preset: EditConfig | None,
                reconstruct: bool) -> dict[str, CaseResult]:
    """One inversion of ``case``'s source at ``steps`` steps, every method's edit of it (first-edit
    seconds: the inversion's plus the edit's), and, with ``reconstruct``, its reconstruction. A
    guided method after another guided one reuses the inversion's cached source passes (a repeat
    edit's cost): the frontier's groups hold one guided method each."""
    source_prompt, target_prompt = prompts or (case.source.caption, case.target.caption)
    start = time.perf_counter()
    inversion = editor.invert(case.source.image, source_prompt, num_steps=steps, progress=False)
    inversion_seconds = time.perf_counter() - start
    results = {}
    for name, method in methods.items():
        start = time.perf_counter()
        edited = editor.edit(inversion, target_prompt, config=method_config(method, steps, preset), progress=False)
        seconds = time.perf_counter() - start
        results[name] = score(judge, case, np.asarray(edited.image), method=name, form=form, sampler=sampler,
                              steps=steps, seconds=seconds, first_edit_seconds=inversion_seconds + seconds)
    if reconstruct:
        rebuilt = editor.edit(inversion, source_prompt, config=reconstruction_config(sampler, steps), progress=False)
        recon = reconstruction_psnr(np.asarray(rebuilt.image), case)
        for result in results.values():
            result.inversion_psnr = recon
    return results


def case_size(editor, consistency: ConsistencyEditors | None = None) -> int:
    """The image side of the run's cases: the DDIM editor's model size, else a consistency editor's."""
    return model_size(editor if editor is not None else next(iter(consistency.editors.values())))


def evaluate(
    editor,
    judge,
    kinds: Sequence[EditKind] = EDIT_KINDS,
    per_kind: int = 50,
    num_steps: int = 50,
    methods: dict[str, Method] | None = None,
    progress: bool = True,
    consistency: ConsistencyEditors | None = None,
    reconstruct: bool = False,
) -> tuple[list[EditCase], list[CaseResult]]:
    """Run every method on ``per_kind`` held-out cases of each kind; return the cases and results
    (``consistency``, ``reconstruct``: as in :func:`run_case`)."""
    methods = methods or {m: METHODS[m] for m in DEFAULT_METHODS}
    size = case_size(editor, consistency)
    cases = [case for kind in kinds for case in make_cases(kind, per_kind, size=size)]
    results: list[CaseResult] = []
    for case in tqdm(cases, desc="quality", disable=not progress):
        results.extend(run_case(editor, judge, case, num_steps, methods, consistency=consistency,
                                reconstruct=reconstruct))
    return cases, results


def model_size(editor) -> int:
    """The image side the editor's model was trained at (UNet sample size x latent factor)."""
    return editor.components.unet.config.sample_size * editor.components.latent_factor


def consistency_steps(method_names: Sequence[str], num_steps: int) -> list[int]:
    """The step counts the named methods need consistency editors for."""
    return list(dict.fromkeys(METHODS[m].num_steps(num_steps) for m in method_names
                              if METHODS[m].sampler == "consistency"))


_WORKER: dict[str, object] = {}


def _init_worker(model: str | None, threads: int, options: ConsistencyOptions | None, steps: tuple[int, ...]) -> None:
    import torch

    from gnr_fast.editor import Editor
    from ..world.judge import load_judge

    torch.set_num_threads(threads)
    _WORKER["editor"] = Editor.from_pretrained(model)
    _WORKER["judge"] = load_judge()
    _WORKER["consistency"] = load_consistency_editors(model, steps, options) if steps else None


def _worker_case(kind: EditKind, seed: int, size: int, num_steps: int, method_names: tuple[str, ...],
                 reconstruct: bool) -> list[CaseResult]:
    case = make_case(kind, seed, size=size)
    return run_case(_WORKER["editor"], _WORKER["judge"], case, num_steps, {m: METHODS[m] for m in method_names},
                    consistency=_WORKER["consistency"], reconstruct=reconstruct)


def evaluate_parallel(
    model: str | None,
    jobs: int,
    kinds: Sequence[EditKind] = EDIT_KINDS,
    per_kind: int = 50,
    num_steps: int = 50,
    method_names: Sequence[str] = DEFAULT_METHODS,
    threads_per_job: int = 1,
    progress: bool = True,
    consistency: ConsistencyOptions | None = None,
    reconstruct: bool = False,
) -> tuple[list[EditCase], list[CaseResult]]:
    """:func:`evaluate` spread over ``jobs`` worker processes, each with its own editors and the
    bundled judge; same cases, same results, same order (every edit is deterministic).
    ``consistency`` says where consistency methods get their files and preset (default: the
    model folder's)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from gnr_fast.editor import Editor

    unknown = [m for m in method_names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    size = model_size(Editor.from_pretrained(model))
    cases = [case for kind in kinds for case in make_cases(kind, per_kind, size=size)]
    steps = tuple(consistency_steps(method_names, num_steps))
    initargs = (model, threads_per_job, consistency or ConsistencyOptions(), steps)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=initargs) as pool:
        futures = [
            pool.submit(_worker_case, c.kind, c.seed, size, num_steps, tuple(method_names), reconstruct) for c in cases
        ]
        results = [r for f in tqdm(futures, desc="quality", disable=not progress) for r in f.result()]
    return cases, results


def summary_rows(results: list[CaseResult]) -> list[dict]:
    """One row per (edit kind, method): success rate and mean preservation metrics and time."""
    rows = []
    for kind in dict.fromkeys(r.kind for r in results):
        for method in dict.fromkeys(r.method for r in results):
            group = [r for r in results if r.kind == kind and r.method == method]
            if not group:
                continue
            rows.append(
                {
                    "kind": kind,
                    "method": method,
                    "n": len(group),
                    "success": float(np.mean([r.success for r in group])),
                    "psnr_keep_db": finite_mean([r.psnr_keep for r in group]),
                    "ssim_keep": finite_mean([r.ssim_keep for r in group]),
                    "perceptual": finite_mean([r.perceptual for r in group]),
                    "seconds": finite_mean([r.seconds for r in group]),
                    "first_edit_seconds": finite_mean([r.first_edit_seconds for r in group]),
                    "inversion_psnr_db": finite_mean([r.inversion_psnr for r in group]),
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| edit kind | method | n | success | PSNR keep (dB) | SSIM keep | perceptual dist. | s / edit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['method']} | {r['n']} | {100 * r['success']:.0f} % | {r['psnr_keep_db']:.1f} | "
            f"{r['ssim_keep']:.3f} | {r['perceptual']:.3f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def write_report(cases: list[EditCase], results: list[CaseResult], out: Path, command: str) -> Path:
    """Write results.md (table), results.json (per-case numbers) and grid.png to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    (out / "results.json").write_text(
        json.dumps({"rows": rows, "cases": case_records(results)}, indent=1)
    )
    picture_grid(cases, results).save(out / "grid.png")
    text = (
        f"# Edit quality on the shapes world\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        + markdown_table(rows)
        + "\n\n![grid](grid.png)\n"
    )
    (out / "results.md").write_text(text)
    return out / "results.md"


def main(argv: Sequence[str] | None = None) -> int:
    """``gnr-fast eval`` / ``python -m gnr_shapes.evaluation.quality``."""
    import sys

    import torch

    from gnr_fast.editor import Editor
    from ..world.judge import load_judge
    from .frontier import host_description, write_frontier

    parser = argparse.ArgumentParser(prog="gnr-fast eval", description="edit-quality benchmark on the shapes world")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--per-kind", type=int, default=50, help="cases per edit kind (default 50)")
    parser.add_argument("--steps", type=int, default=50, help="steps of the methods that name none (default 50)")
    parser.add_argument("--kinds", nargs="+", default=list(EDIT_KINDS), choices=EDIT_KINDS)
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help=f"default: {' '.join(DEFAULT_METHODS)} (with --frontier: {' '.join(FRONTIER_METHODS)})")
    parser.add_argument("--frontier", action="store_true",
                        help="the quality/latency frontier: also reconstruct every inversion, and write frontier.md, "
                             "frontier.json, frontier.png and frontier_grid.png instead of results.*")
    parser.add_argument("--out", default="benchmarks/quality")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (per job with --jobs)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1: in this process)")
    group = parser.add_argument_group("consistency methods (cons-*)", "the model folder's consistency files and "
                                      "preset unless named here")
    group.add_argument("--consistency-preset", default=None, metavar="NAME_OR_YAML",
                       help="preset written for the consistency model's boundaries, a name or a YAML file "
                            "(default: the model's consistency preset)")
    group.add_argument("--teacher-unet", default=None, metavar="FILE", help="guidance-distilled UNet state dict (.pt)")
    group.add_argument("--reverse-lora", default=None, metavar="FILE", help="reverse consistency LoRA (.safetensors)")
    group.add_argument("--forward-lora", default=None, metavar="FILE", help="forward consistency LoRA (.safetensors)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    method_names = args.methods or list(FRONTIER_METHODS if args.frontier else DEFAULT_METHODS)
    options = ConsistencyOptions(args.teacher_unet, args.reverse_lora, args.forward_lora, args.consistency_preset)
    check_writable_dir(args.out, "--out")  # before the evaluation, not after it
    load_before = os.getloadavg()
    if args.jobs > 1:
        cases, results = evaluate_parallel(
            args.model, args.jobs, args.kinds, args.per_kind, args.steps, method_names, args.threads or 1,
            consistency=options, reconstruct=args.frontier,
        )
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        steps = consistency_steps(method_names, args.steps)
        consistency = load_consistency_editors(args.model, steps, options) if steps else None
        cases, results = evaluate(
            Editor.from_pretrained(args.model), load_judge(), args.kinds, args.per_kind, args.steps,
            {m: METHODS[m] for m in method_names}, consistency=consistency, reconstruct=args.frontier,
        )
    load_after = os.getloadavg()
    command = "gnr-fast eval " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.frontier:
        threads = args.threads or (1 if args.jobs > 1 else torch.get_num_threads())
        context = (
            f"Host: {host_description()}; {args.jobs} job(s) x {threads} torch "
            f"thread(s). Seconds are wall time measured inside the run under this load: load average (1, 5, 15 min) "
            f"{' / '.join(f'{v:.2f}' for v in load_before)} before, {' / '.join(f'{v:.2f}' for v in load_after)} after."
        )
        path = write_frontier(case_records(results), Path(args.out), command, context, picture_grid(cases, results))
        print(path.read_text())
    else:
        path = write_report(cases, results, Path(args.out), command)
        print(markdown_table(summary_rows(results)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
