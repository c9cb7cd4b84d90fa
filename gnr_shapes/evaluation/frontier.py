"""The quality/latency frontier (issue 35): one row and one plotted point per edit method.

Written by ``gnr-fast eval --frontier`` (:mod:`gnr_shapes.evaluation.quality`'s ``main``):
``frontier.md`` (table), ``frontier.json`` (rows and every case's numbers), ``frontier.png``
(seconds per first edit against kept-region PSNR, one labelled point per method) and
``frontier_grid.png`` (example edits). ``python -m gnr_shapes.evaluation.frontier RUN.json ...``
rebuilds the table, JSON and plot from the cases of several runs (e.g. the DDIM methods and the
consistency methods run apart; ``RUN.json:METHOD,...`` takes some methods of a run). The plot is drawn with PIL: nothing beyond the engine's dependencies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .metrics import finite_mean

SAMPLER_COLOURS = {"ddim": (31, 119, 180), "consistency": (230, 85, 13)}
"""Marker colour of each sampler's points (RGB)."""
ALL_KINDS = "all"


def frontier_rows(cases: list[dict]) -> list[dict]:
    """One row per method, in the cases' order, from per-case records (a
    :class:`~gnr_shapes.evaluation.report.CaseResult`'s fields): its sampler and steps, success and
    kept-region PSNR per edit kind and over all cases (``"all"``), mean inversion-reconstruction
    PSNR, seconds per edit and per first edit (inversion included)."""
    kinds = list(dict.fromkeys(c["kind"] for c in cases))
    rows = []
    for method in dict.fromkeys(c["method"] for c in cases):
        group = [c for c in cases if c["method"] == method]
        by_kind = {kind: [c for c in group if c["kind"] == kind] for kind in kinds} | {ALL_KINDS: group}
        rows.append(
            {
                "method": method,
                "sampler": group[0]["sampler"],
                "steps": group[0]["steps"],
                "n": len(group),
                "success": {k: float(np.mean([c["success"] for c in g])) for k, g in by_kind.items() if g},
                "psnr_keep_db": {k: finite_mean([c["psnr_keep"] for c in g]) for k, g in by_kind.items() if g},
                "inversion_psnr_db": finite_mean([c["inversion_psnr"] for c in group]),
                "seconds": finite_mean([c["seconds"] for c in group]),
                "first_edit_seconds": finite_mean([c["first_edit_seconds"] for c in group]),
            }
        )
    return rows


def frontier_table(rows: list[dict]) -> str:
    """The rows as a markdown table (per-kind columns in the rows' kind order)."""
    kinds = [k for k in rows[0]["success"] if k != ALL_KINDS]
    per_kind = " / ".join(kinds)
    lines = [
        f"| method | sampler | steps | n | success ({per_kind}) | success | PSNR keep ({per_kind}, dB) | PSNR keep (dB) "
        "| inversion PSNR (dB) | s / edit | s / first edit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        success = " / ".join(f"{100 * r['success'][k]:.0f}" for k in kinds)
        psnr = " / ".join(f"{r['psnr_keep_db'][k]:.1f}" for k in kinds)
        lines.append(
            f"| {r['method']} | {r['sampler']} | {r['steps']} | {r['n']} | {success} % | "
            f"{100 * r['success'][ALL_KINDS]:.0f} % | {psnr} | {r['psnr_keep_db'][ALL_KINDS]:.1f} | "
            f"{r['inversion_psnr_db']:.1f} | {r['seconds']:.2f} | {r['first_edit_seconds']:.2f} |"
        )
    return "\n".join(lines)


def issue_bars(cases: list[dict], reference: str = "gar-shapes", candidate: str = "cons-gar-4") -> str:
    """Issue 35's bars for ``candidate`` against ``reference`` on the cases both edited (kept-region
    PSNR within 2 dB, success within 5 points, ≥ 8× less time per first edit), as one markdown
    line; empty when they share no case."""
    keys = {method: {(c["kind"], c["seed"]) for c in cases if c["method"] == method} for method in (reference, candidate)}
    common = keys[reference] & keys[candidate]
    if not common:
        return ""
    rows = {r["method"]: r for r in frontier_rows([c for c in cases if c["method"] in (reference, candidate)
                                                   and (c["kind"], c["seed"]) in common])}
    ref, cand = rows[reference], rows[candidate]
    psnr = cand["psnr_keep_db"][ALL_KINDS] - ref["psnr_keep_db"][ALL_KINDS]
    success = 100 * (cand["success"][ALL_KINDS] - ref["success"][ALL_KINDS])
    speedup = ref["first_edit_seconds"] / cand["first_edit_seconds"]
    verdicts = [
        f"kept-region PSNR {psnr:+.1f} dB ({'meets' if psnr >= -2.0 else 'misses'} the bar: within 2 dB)",
        f"success {success:+.0f} points ({'meets' if success >= -5.0 else 'misses'} the bar: within 5)",
        f"first edit {speedup:.1f}x faster ({'meets' if speedup >= 8.0 else 'misses'} the bar: at least 8x)",
    ]
    return f"**{candidate} vs {reference}** (the {len(common)} cases both edited): " + "; ".join(verdicts) + "."


def _nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering [low, high] with about ``count`` ticks."""
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    """The values 1, 2 and 5 × 10^k in [low, high] (ticks of a log axis)."""
    ticks = [m * 10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1) for m in (1, 2, 5)]
    return [t for t in ticks if low <= t <= high]


@dataclass(frozen=True)
class PlotAxes:
    """The plot's data ranges and drawing area: x = seconds per first edit (log scale), y = kept-region PSNR."""

    seconds: tuple[float, float]
    psnr: tuple[float, float]
    box: tuple[int, int, int, int]  # left, top, right, bottom (pixels)

    def to_pixel(self, seconds: float, psnr: float) -> tuple[int, int]:
        left, top, right, bottom = self.box
        lo, hi = math.log10(self.seconds[0]), math.log10(self.seconds[1])
        x = left + (math.log10(seconds) - lo) / (hi - lo) * (right - left)
        y = bottom - (psnr - self.psnr[0]) / (self.psnr[1] - self.psnr[0]) * (bottom - top)
        return round(x), round(y)


def frontier_axes(rows: list[dict], size: tuple[int, int] = (760, 480)) -> PlotAxes:
    """Axes that hold every row's point with a margin (a fifth of a decade, 1 dB)."""
    seconds = [r["first_edit_seconds"] for r in rows]
    psnr = [r["psnr_keep_db"][ALL_KINDS] for r in rows]
    margin = 10**0.2
    return PlotAxes((min(seconds) / margin, max(seconds) * margin), (min(psnr) - 1.0, max(psnr) + 1.0),
                    (70, 40, size[0] - 30, size[1] - 60))


def frontier_plot(rows: list[dict], size: tuple[int, int] = (760, 480)) -> Image.Image:
    """Seconds per first edit (log x) against kept-region PSNR over all cases, one labelled point per
    method, coloured by sampler (:data:`SAMPLER_COLOURS`)."""
    axes = frontier_axes(rows, size)
    left, top, right, bottom = axes.box
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    grey, black = (200, 200, 200), (0, 0, 0)
    for seconds in _log_ticks(*axes.seconds):
        x, _ = axes.to_pixel(seconds, axes.psnr[0])
        draw.line([(x, top), (x, bottom)], fill=grey)
        draw.text((x - 8, bottom + 6), f"{seconds:g}", fill=black)
    for value in _nice_ticks(*axes.psnr):
        _, y = axes.to_pixel(axes.seconds[0], value)
        draw.line([(left, y), (right, y)], fill=grey)
        draw.text((left - 40, y - 6), f"{value:g}", fill=black)
    draw.rectangle([left, top, right, bottom], outline=black)
    draw.text((left, 8), "kept-region PSNR (dB, mean over all cases) vs seconds per first edit", fill=black)
    draw.text((left - 60, top - 16), "PSNR keep (dB)", fill=black)
    draw.text(((left + right) // 2 - 110, bottom + 30), "seconds per first edit (inversion + edit, log scale)",
              fill=black)
    for row in rows:
        x, y = axes.to_pixel(row["first_edit_seconds"], row["psnr_keep_db"][ALL_KINDS])
        colour = SAMPLER_COLOURS.get(row["sampler"], black)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
        draw.text((x + 8, y - 6), row["method"], fill=colour)
    for i, (sampler, colour) in enumerate(SAMPLER_COLOURS.items()):  # legend, above the box
        x = right - 180 + 90 * i
        draw.ellipse([x, top - 16, x + 8, top - 8], fill=colour)
        draw.text((x + 12, top - 18), sampler, fill=black)
    return image


def host_description() -> str:
    """This machine's CPU model (``/proc/cpuinfo`` where there is one) and logical CPU count."""
    cpuinfo = Path("/proc/cpuinfo")
    model = "unknown CPU"
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} logical CPUs"


def write_frontier(cases: list[dict], out: Path, command: str, context: str, grid: Image.Image | None = None) -> Path:
    """Write frontier.md (``context`` — host, load, jobs — above the table), frontier.json,
    frontier.png and, when given, ``grid`` as frontier_grid.png to ``out``; return the markdown
    file's path. ``cases`` are per-case records (:func:`frontier_rows`)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = frontier_rows(cases)
    (out / "frontier.json").write_text(json.dumps({"context": context, "rows": rows, "cases": cases}, indent=1))
    frontier_plot(rows).save(out / "frontier.png")
    pictures = "\n\n![frontier](frontier.png)\n"
    if grid is not None:
        grid.save(out / "frontier_grid.png")
        pictures += "\n![grid](frontier_grid.png)\n"
    text = (
        f"# Quality/latency frontier on the shapes world\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"{context}\n\n" + frontier_table(rows) + "\n\n" + issue_bars(cases) + pictures
    )
    (out / "frontier.md").write_text(text)
    return out / "frontier.md"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gnr_shapes.evaluation.frontier RUN.json[:METHOD,...] ... --out DIR``: one frontier
    from the cases of several ``gnr-fast eval --frontier`` runs (each method from one run only;
    ``:METHOD,...`` takes only those methods of a run)."""
    import sys

    parser = argparse.ArgumentParser(description="merge quality/latency frontier runs into one table and plot")
    parser.add_argument("runs", nargs="+", help="frontier.json files written by gnr-fast eval --frontier, each "
                                                "optionally followed by :METHOD,... to take only those methods")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/quality"))
    args = parser.parse_args(argv)
    cases, contexts, owner = [], [], {}
    for spec in args.runs:
        path, _, chosen = spec.partition(":")
        run = Path(path)
        data = json.loads(run.read_text())
        present = list(dict.fromkeys(c["method"] for c in data["cases"]))
        methods = chosen.split(",") if chosen else present
        missing = [m for m in methods if m not in present]
        if missing:
            parser.error(f"{run} has no cases of {missing}; it has {present}")
        for method in methods:
            if method in owner:
                parser.error(f"method {method!r} is in both {owner[method]} and {run}")
            owner[method] = run
        cases.extend(c for c in data["cases"] if c["method"] in methods)
        contexts.append(f"- `{run}` ({', '.join(methods)}): {data['context']}")
    command = "python -m gnr_shapes.evaluation.frontier " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_frontier(cases, args.out, command, "Runs merged:\n\n" + "\n".join(contexts))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
