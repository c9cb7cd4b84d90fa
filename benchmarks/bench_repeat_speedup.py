"""Estimate an image's first-edit and repeat-edit time from timed single steps, and their ratio.

A repeat edit skips what the inversion cache holds (the VAE encode, the N inversion passes and the
source row of each guided step) and runs the rest of a first edit. This script times, on one model
and thread count, the VAE encode, one inversion step and one fast-mode step of every kind that the
edit plans contain (``gnr_fast.fast.plan_edit``: unguided, guided with and without the cached
source pass, ...), then adds them up as the plans of a first and of a repeat edit say::

    first  = encode + N × inversion step + Σ steps of a first edit
    repeat = Σ steps of a repeat edit

Decoding, PNG and HTTP, the same in both, are left out, so the ratio measured through the server
(``bench_server_load.py``) sits a little below this one. It serves models too slow to run whole
edits of here (SD 1.5 at 512² on a CPU); ``--whole`` also times a real first and repeat edit, to
check the estimate on models where that is cheap.

    python benchmarks/bench_repeat_speedup.py --model bundled|golden|sd15 [--latent 64] [--threads 1] [--whole]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gnr_fast import EditConfig, Editor  # noqa: E402
from gnr_fast.editing import EditContext  # noqa: E402
from gnr_fast.fast import StepPlan, fast_step, plan_edit  # noqa: E402
from gnr_fast.images import encode_latent  # noqa: E402
from gnr_fast.loading import BUNDLED_MODEL  # noqa: E402

SOURCE, TARGET = "a red circle on a plain blue background", "a green circle on a plain blue background"


def step_kind(plan: StepPlan) -> str:
    """A step's calls and backward without its index: steps of one kind cost the same."""
    return plan.describe().split(": ", 1)[1]


@dataclass
class Estimate:
    encode_s: float
    inversion_step_s: float
    kind_s: dict[str, float]  # seconds per step of each kind
    first_kinds: list[str]  # kind of each step of a first edit
    repeat_kinds: list[str]

    @property
    def first_s(self) -> float:
        n = len(self.first_kinds)
        return self.encode_s + n * self.inversion_step_s + sum(self.kind_s[k] for k in self.first_kinds)

    @property
    def repeat_s(self) -> float:
        return sum(self.kind_s[k] for k in self.repeat_kinds)

    def markdown(self) -> str:
        lines = ["| step kind | steps in a first edit | in a repeat edit | s per step |", "|---|---|---|---|",
                 f"| VAE encode | 1 | 0 | {self.encode_s:.3f} |",
                 f"| inversion step: no-grad[z*\\|src] | {len(self.first_kinds)} | 0 | {self.inversion_step_s:.3f} |"]
        for kind, seconds in self.kind_s.items():
            cell = kind.replace("|", "\\|")  # a row's "latent|prompt" would split the table cell
            lines.append(f"| {cell} | {self.first_kinds.count(kind)} | {self.repeat_kinds.count(kind)} | {seconds:.3f} |")
        lines.append("")
        lines.append(f"Estimated first edit {self.first_s:.2f} s, repeat edit {self.repeat_s:.2f} s: "
                     f"**repeat {self.first_s / self.repeat_s:.2f}× faster**.")
        return "\n".join(lines)


def _median_s(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def estimate(editor: Editor, config: EditConfig, latent: int, repeats: int = 3) -> Estimate:
    """Time every step kind of ``config``'s first and repeat edit on ``editor`` at ``latent``² latents."""
    components = editor.components
    ctx = EditContext.build(components, editor.runner, config, editor.self_attn_layers,
                            editor.embed(""), editor.embed(SOURCE), editor.embed(TARGET))
    generator = torch.Generator().manual_seed(0)
    z_star = torch.randn(1, 4, latent, latent, generator=generator, dtype=components.dtype)
    z_moved = z_star + 0.1 * torch.randn(z_star.shape, generator=generator, dtype=components.dtype)
    first, repeat = plan_edit(config), plan_edit(config, source_cached=True)

    kind_s: dict[str, float] = {}
    for source_cached, plans in ((False, first), (True, repeat)):
        for step, plan in enumerate(plans):
            kind = step_kind(plan)
            if kind in kind_s:
                continue
            z = z_star if step == 0 and config.align_inversion == "reference" else z_moved
            if source_cached:
                ctx.state.source_cache = editor.new_source_cache(ctx)
                fast_step(ctx, z, z_star, step)  # fills the step's source entry

                def run(step=step, z=z) -> None:
                    fast_step(ctx, z, z_star, step)
            else:
                def run(step=step, z=z) -> None:
                    ctx.state.source_cache = editor.new_source_cache(ctx)  # empty: the step runs and stores its source row
                    fast_step(ctx, z, z_star, step)
            rows_before = editor.runner.rows
            run()  # also the warm-up
            if editor.runner.rows - rows_before != plan.rows:
                raise AssertionError(f"step {step} ran {editor.runner.rows - rows_before} rows, its plan {plan.rows}")
            kind_s[kind] = _median_s(run, repeats, warm_up=False)

    pixels = torch.rand(1, 3, 8 * latent, 8 * latent, generator=generator) * 2 - 1
    encode_s = _median_s(lambda: encode_latent(components.vae, pixels, components.scaling_factor), repeats)

    def inversion_step() -> None:
        with torch.no_grad():
            editor.runner.plain(z_star, torch.tensor(int(ctx.timesteps[-1]), device=z_star.device), ctx.c_src)

    return Estimate(encode_s, _median_s(inversion_step, repeats), kind_s,
                    [step_kind(p) for p in first], [step_kind(p) for p in repeat])


def whole_edits(editor: Editor, config: EditConfig, latent: int) -> tuple[float, float]:
    """Seconds of a real first edit (inversion included, decoding excluded) and of a repeat edit."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (8 * latent, 8 * latent), (40, 60, 200))
    ImageDraw.Draw(image).ellipse((2 * latent, 2 * latent, 5 * latent, 5 * latent), fill=(220, 30, 30))
    editor.edit(image, TARGET, source_prompt=SOURCE, config=config, progress=False)  # warm-up
    image.putpixel((0, 0), (0, 0, 0))  # a fresh image: nothing of it is cached
    first = editor.edit(image, TARGET, source_prompt=SOURCE, config=config, progress=False)
    repeat = editor.edit(first.inversion, "a yellow circle on a plain blue background", config=config, progress=False)
    return first.timings.inversion_s + first.timings.editing_s, repeat.timings.editing_s


def load(model: str) -> tuple[Editor, int, str]:
    """The editor, its default latent side and a description, for ``bundled``, ``golden`` or ``sd15``."""
    from benchmarks.models import golden_editor, sd15_editor

    if model == "bundled":
        return Editor.from_pretrained(BUNDLED_MODEL), 16, "bundled `shapes-v1`"
    if model == "golden":
        editor = golden_editor()
        if editor is None:
            raise SystemExit("the golden model lives in ../shared/golden, which is absent here")
        return editor, 32, "golden tiny SD"
    return sd15_editor(), 64, "SD 1.5 architecture, random weights"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("bundled", "golden", "sd15"), default="bundled")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the model's; image = 8×)")
    parser.add_argument("--preset", default="nonstyle")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step kind, median (default 3)")
    parser.add_argument("--whole", action="store_true", help="also time a real first and repeat edit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    editor, default_latent, name = load(args.model)
    latent = args.latent or default_latent
    config = editor.resolve_config(args.preset, num_steps=args.steps)
    result = estimate(editor, config, latent, args.repeats)
    print(f"{name}, {8 * latent}² images ({latent}² latents), {args.preset}, {args.steps} steps, "
          f"{args.threads} torch thread(s), {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(result.markdown())
    if args.whole:
        first_s, repeat_s = whole_edits(editor, config, latent)
        print(f"\nMeasured whole edits: first {first_s:.2f} s (inversion + edit), repeat {repeat_s:.2f} s: "
              f"**{first_s / repeat_s:.2f}×**.")


def test_repeat_speedup_estimate(record):
    """pytest entry: the estimate on the bundled model (first = reference column, repeat = fast)."""
    if not (BUNDLED_MODEL / "model_index.json").is_file():
        pytest.skip(f"bundled model absent at {BUNDLED_MODEL}")
    editor, latent, _ = load("bundled")
    result = estimate(editor, editor.resolve_config("nonstyle"), latent, repeats=2)
    print(result.markdown())
    record("estimated first vs repeat edit", "reference", seconds=result.first_s)
    record("estimated first vs repeat edit", "fast", seconds=result.repeat_s)


if __name__ == "__main__":
    main()
