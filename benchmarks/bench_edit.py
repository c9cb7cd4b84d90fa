"""Reference vs fast mode, side by side in one run (issue 3): steps, inversion, whole and repeat edits, memory.

Every timed case runs both modes in one test: ``--warmup`` untimed calls of each, then ``--rounds``
rounds alternating the modes (A B, B A, …; :mod:`benchmarks.alternating`). The table printed at
the end (and written to ``benchmarks/results/latest.json``) gives each mode's median with the
min–max of its rounds and the ratio of the two medians; its rows are the README's tables.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_edit.py -k golden -s --rounds 3 --warmup 1
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_edit.py -k sd15 -s --rounds 2 --warmup 1
    python -m pytest benchmarks/bench_edit.py -k tiny -s --rounds 1 --warmup 0    # smoke run, seconds
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from benchmarks.alternating import alternate
from benchmarks.memory import LargestTensor, peak_rss_mb
from benchmarks.models import golden_editor, sd15_editor, tiny_editor
from gnr_fast.config import EditConfig
from gnr_fast.editing import EditContext
from gnr_fast.fast.step import fast_step
from gnr_fast.reference.step import reference_step

SETUPS = {
    # name: (editor factory, image size, steps, guided step, unguided step)
    "golden": (golden_editor, 256, 50, 5, 40),
    "sd15": (sd15_editor, 256, 6, 2, 5),
    "tiny": (tiny_editor, 64, 4, 1, 3),  # smoke runs of the benchmark code, not for numbers
}
STEP_FNS = {"reference": reference_step, "fast": fast_step}
MODES = ("reference", "fast")
SOURCE = "a red square on a blue background"
TARGET = "a green square on a blue background"


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request):
    factory, size, steps, guided, unguided = SETUPS[request.param]
    editor = factory()
    if editor is None:
        pytest.skip("golden model not found (shared/golden is absent)")
    image = Image.new("RGB", (size, size), (40, 60, 200))
    image.paste((220, 30, 30), (size // 4, size // 4, size // 2, size // 2))
    inversion = editor.invert(image, SOURCE, num_steps=steps, progress=False)
    config = EditConfig.nonstyle(steps)
    ctx = EditContext.build(editor.components, editor.runner, config, editor.self_attn_layers, editor.embed(""),
                            editor.embed(inversion.source_prompt), editor.embed(TARGET))
    return {"name": request.param, "editor": editor, "image": image, "inversion": inversion, "ctx": ctx,
            "steps": steps, "guided": guided, "unguided": unguided, "size": size}


def _pair(s, step):
    z_star = s["inversion"].latents[s["steps"] - step]
    z = z_star + 0.05 * torch.randn(z_star.shape, generator=torch.Generator().manual_seed(step))
    return z, z_star


def _record_pair(record, case: str, samples: dict, **extra_by_mode) -> None:
    for mode in MODES:
        record(case, mode, samples=samples[mode], **extra_by_mode.get(mode, {}))


def _step_case(setup, record, rounds, warmup, which: str) -> None:
    step = setup[which]
    z, z_star = _pair(setup, step)
    ctx = setup["ctx"]
    samples = alternate({m: (lambda fn=STEP_FNS[m]: fn(ctx, z, z_star, step)) for m in MODES}, rounds, warmup)
    extra = {}
    if which == "guided":
        for mode in MODES:
            with LargestTensor() as largest:
                STEP_FNS[mode](ctx, z, z_star, step)
            extra[mode] = {f"largest_tensor_MiB_{mode}": round(largest.bytes / 2**20, 1)}
    _record_pair(record, f"{setup['name']}: one {which} step", samples, **extra)


def test_guided_step(setup, record, rounds, warmup):
    _step_case(setup, record, rounds, warmup, "guided")


def test_unguided_step(setup, record, rounds, warmup):
    _step_case(setup, record, rounds, warmup, "unguided")


def test_inversion(setup, record, rounds, warmup):
    """Both modes invert with the same code; timing it for each side, alternated, shows the noise level."""
    editor = setup["editor"]

    def invert():
        editor.invert(setup["image"], SOURCE, num_steps=setup["steps"], progress=False)

    samples = alternate({"reference": invert, "fast": invert}, rounds, warmup)
    _record_pair(record, f"{setup['name']}: inversion ({setup['steps']} steps, same code in both modes)", samples)


def _counting(editor, rows: dict, mode: str, run):
    def counted():
        before = editor.runner.rows
        run()
        rows[mode] = editor.runner.rows - before

    return counted


def test_whole_edit(setup, record, rounds, warmup):
    editor, rows = setup["editor"], {}
    variants = {
        mode: _counting(editor, rows, mode, lambda mode=mode: editor.edit(
            setup["image"], TARGET, source_prompt=SOURCE, num_steps=setup["steps"], mode=mode, progress=False))
        for mode in MODES
    }
    samples = alternate(variants, rounds, warmup)
    _record_pair(record, f"{setup['name']}: whole edit (incl. inversion)", samples,
                 **{m: {f"unet_rows_{m}": rows[m]} for m in MODES})


def test_repeat_edit(setup, record, rounds, warmup):
    """Edits of one inversion; the fast mode's source cache is filled before the first timed round."""
    editor, inversion, rows = setup["editor"], setup["inversion"], {}
    target = "a yellow square on a blue background"
    inversion.source_cache = None
    editor.edit(inversion, target, mode="fast", progress=False)  # fills the cache (warm-up or not)
    variants = {
        mode: _counting(editor, rows, mode, lambda mode=mode: editor.edit(inversion, target, mode=mode, progress=False))
        for mode in MODES
    }
    samples = alternate(variants, rounds, warmup)
    assert inversion.source_cache is not None and inversion.source_cache.hits > 0
    _record_pair(record, f"{setup['name']}: repeat edit (cached inversion)", samples,
                 **{m: {f"unet_rows_{m}": rows[m]} for m in MODES})


def test_peak_rss(setup, record):
    """Memory, not time: one fresh process per mode (benchmarks/memory.py), reported beside the timings."""
    for mode in MODES:
        rss = peak_rss_mb(setup["name"], mode, setup["steps"], setup["size"])
        record(f"{setup['name']}: edit peak RSS (MiB)", mode, seconds=None, **{f"{k}_{mode}": v for k, v in rss.items()})
