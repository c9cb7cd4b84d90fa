"""The edit-quality benchmark (issue 4): GaR vs "DDIM inversion + CFG" on held-out shapes-world edits.

For each case the source scene is inverted once and edited by every method. A method succeeds
when the judge reads the target's attributes from the edited image (the edited one changed,
the others kept; object size is not judged). Preservation is measured on the region that should
not change (known from the world's masks): PSNR, SSIM, and a judge-feature perceptual distance.

Run: ``gnr-fast eval --per-kind 50 --out benchmarks/quality`` (writes ``results.md``, ``grid.png``
and ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from gnr_fast.config import CfgGuider, EditConfig, RescaleConfig
from gnr_fast.outputs import check_writable_dir
from ..world.judge import attributes_of
from .cases import EDIT_KINDS, EditCase, EditKind, make_case, make_cases
from .metrics import feature_distance, masked_psnr, masked_ssim

MethodFactory = Callable[[int], EditConfig]


def baseline_config(num_steps: int, cfg: float = 7.5) -> EditConfig:
    """DDIM inversion + CFG toward the target prompt, no guiders (the paper's "DDIM + CFG" baseline)."""
    return EditConfig(guiders=(CfgGuider(cfg),), rescale=RescaleConfig("identity_rescaler"), num_steps=num_steps)


METHODS: dict[str, MethodFactory] = {
    "baseline": baseline_config,
    # The baseline at the CFG scale of the `shapes` preset, to compare preservation at comparable guidance.
    "baseline-cfg4": lambda num_steps: baseline_config(num_steps, cfg=4.0),
    "gar-nonstyle": EditConfig.nonstyle,
    "gar-style": EditConfig.style,
    "gar-shapes": EditConfig.shapes,
}


@dataclass
class CaseResult:
    """One method on one case."""

    kind: str
    seed: int
    method: str
    success: bool
    psnr_keep: float
    ssim_keep: float
    perceptual: float
    seconds: float
    image: np.ndarray = field(repr=False)
    form: str = "full"  # caption form of the prompts (world.captions.CAPTION_FORMS)


def judge_success(judge, edited: np.ndarray, case: EditCase) -> bool:
    """The judge reads the target scene's attributes (object sizes excepted) from ``edited``."""
    predicted = judge.predict(edited[None])[0]
    truth = attributes_of(case.target.spec)
    fields = ("background_kind", "background_colours", "main_shape", "main_colour", "second_shape", "second_colour")
    return all(getattr(predicted, f) == getattr(truth, f) for f in fields)


def run_case(editor, judge, case: EditCase, num_steps: int, methods: dict[str, MethodFactory],
             prompts: tuple[str, str] | None = None, form: str = "full") -> list[CaseResult]:
    """Invert ``case``'s source once, edit it with every method, and score each edit.

    ``prompts`` (source, target) replaces the scenes' grammar captions (the prompt-robustness
    benchmark writes them in other forms); ``form`` labels the results.
    """
    source_prompt, target_prompt = prompts or (case.source.caption, case.target.caption)
    inversion = editor.invert(case.source.image, source_prompt, num_steps=num_steps, progress=False)
    results = []
    for name, factory in methods.items():
        start = time.perf_counter()
        edited = editor.edit(inversion, target_prompt, config=factory(num_steps), progress=False)
        seconds = time.perf_counter() - start
        image = np.asarray(edited.image)
        results.append(
            CaseResult(
                kind=case.kind,
                seed=case.seed,
                method=name,
                success=judge_success(judge, image, case),
                psnr_keep=masked_psnr(image, case.source.image, case.keep_mask),
                ssim_keep=masked_ssim(image, case.source.image, case.keep_mask),
                perceptual=feature_distance(judge, image, case.source.image),
                seconds=seconds,
                image=image,
                form=form,
            )
        )
    return results


def evaluate(
    editor,
    judge,
    kinds: Sequence[EditKind] = EDIT_KINDS,
    per_kind: int = 50,
    num_steps: int = 50,
    methods: dict[str, MethodFactory] | None = None,
    progress: bool = True,
) -> tuple[list[EditCase], list[CaseResult]]:
    """Run every method on ``per_kind`` held-out cases of each kind; return the cases and results."""
    methods = methods or METHODS
    cases = [case for kind in kinds for case in make_cases(kind, per_kind, size=model_size(editor))]
    results: list[CaseResult] = []
    for case in tqdm(cases, desc="quality", disable=not progress):
        results.extend(run_case(editor, judge, case, num_steps, methods))
    return cases, results


def model_size(editor) -> int:
    """The image side the editor's model was trained at (UNet sample size x latent factor)."""
    return editor.components.unet.config.sample_size * editor.components.latent_factor


_WORKER: dict[str, object] = {}


def _init_worker(model: str | None, threads: int) -> None:
    import torch

    from gnr_fast.editor import Editor
    from ..world.judge import load_judge

    torch.set_num_threads(threads)
    _WORKER["editor"] = Editor.from_pretrained(model)
    _WORKER["judge"] = load_judge()


def _worker_case(kind: EditKind, seed: int, size: int, num_steps: int, method_names: tuple[str, ...]) -> list[CaseResult]:
    case = make_case(kind, seed, size=size)
    return run_case(_WORKER["editor"], _WORKER["judge"], case, num_steps, {m: METHODS[m] for m in method_names})


def evaluate_parallel(
    model: str | None,
    jobs: int,
    kinds: Sequence[EditKind] = EDIT_KINDS,
    per_kind: int = 50,
    num_steps: int = 50,
    method_names: Sequence[str] = tuple(METHODS),
    threads_per_job: int = 1,
    progress: bool = True,
) -> tuple[list[EditCase], list[CaseResult]]:
    """:func:`evaluate` spread over ``jobs`` worker processes, each with its own editor and the
    bundled judge; same cases, same results, same order (every edit is deterministic)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from gnr_fast.editor import Editor

    unknown = [m for m in method_names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    size = model_size(Editor.from_pretrained(model))
    cases = [case for kind in kinds for case in make_cases(kind, per_kind, size=size)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(model, threads_per_job)) as pool:
        futures = [
            pool.submit(_worker_case, c.kind, c.seed, size, num_steps, tuple(method_names)) for c in cases
        ]
        results = [r for f in tqdm(futures, desc="quality", disable=not progress) for r in f.result()]
    return cases, results


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values (PSNR is inf for identical images); NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


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


def picture_grid(cases: list[EditCase], results: list[CaseResult], rows_per_kind: int = 3) -> Image.Image:
    """Rows of source | target truth | each method's edit, ``rows_per_kind`` cases per kind."""
    methods = list(dict.fromkeys(r.method for r in results))
    by_key = {(r.kind, r.seed, r.method): r.image for r in results}
    chosen = [c for kind in dict.fromkeys(c.kind for c in cases) for c in [c for c in cases if c.kind == kind][:rows_per_kind]]
    side = cases[0].source.image.shape[0]
    header = 14
    grid = Image.new("RGB", ((2 + len(methods)) * side, header + len(chosen) * side), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(["source", "target (truth)", *methods]):
        draw.text((col * side + 2, 1), title, fill="black")
    for row, case in enumerate(chosen):
        tiles = [case.source.image, case.target.image] + [by_key[(case.kind, case.seed, m)] for m in methods]
        for col, tile in enumerate(tiles):
            grid.paste(Image.fromarray(tile), (col * side, header + row * side))
    return grid


def write_report(cases: list[EditCase], results: list[CaseResult], out: Path, command: str) -> Path:
    """Write results.md (table), results.json (per-case numbers) and grid.png to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    (out / "results.json").write_text(
        json.dumps({"rows": rows, "cases": [{k: v for k, v in asdict(r).items() if k != "image"} for r in results]}, indent=1)
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
    import torch

    from gnr_fast.editor import Editor
    from ..world.judge import load_judge

    parser = argparse.ArgumentParser(prog="gnr-fast eval", description="edit-quality benchmark on the shapes world")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--per-kind", type=int, default=50, help="cases per edit kind (default 50)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--kinds", nargs="+", default=list(EDIT_KINDS), choices=EDIT_KINDS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="benchmarks/quality")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (per job with --jobs)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1: in this process)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    check_writable_dir(args.out, "--out")  # before the evaluation, not after it
    if args.jobs > 1:
        cases, results = evaluate_parallel(
            args.model, args.jobs, args.kinds, args.per_kind, args.steps, args.methods, args.threads or 1
        )
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        cases, results = evaluate(
            Editor.from_pretrained(args.model), load_judge(), args.kinds, args.per_kind, args.steps,
            {m: METHODS[m] for m in args.methods},
        )
    command = "gnr-fast eval " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    path = write_report(cases, results, Path(args.out), command)
    print(markdown_table(summary_rows(results)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
