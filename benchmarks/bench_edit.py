"""Reference vs fast mode, side by side in one run (issue 3): steps, whole edits, repeat edits, passes, memory.

Run: ``python -m pytest benchmarks/bench_edit.py --benchmark-only -s`` (add ``-k golden`` or ``-k sd15``).
The ratio table is printed at the end and written to ``benchmarks/results/latest.json``.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from benchmarks.conftest import mean_seconds
from benchmarks.memory import LargestTensor, peak_rss_mb
from benchmarks.models import golden_editor, sd15_editor
from gnr_fast.config import EditConfig
from gnr_fast.editing import EditContext
from gnr_fast.fast.step import fast_step
from gnr_fast.reference.step import reference_step

SETUPS = {
    # name: (editor factory, image size, steps, guided step, unguided step, rounds for steps)
    "golden": (golden_editor, 256, 50, 5, 40, 3),
    "sd15": (sd15_editor, 256, 6, 2, 5, 1),
}
STEP_FNS = {"reference": reference_step, "fast": fast_step}


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request):
    factory, size, steps, guided, unguided, rounds = SETUPS[request.param]
    editor = factory()
    if editor is None:
        pytest.skip("golden model not found (shared/golden is absent)")
    image = Image.new("RGB", (size, size), (40, 60, 200))
    image.paste((220, 30, 30), (size // 4, size // 4, size // 2, size // 2))
    inversion = editor.invert(image, "a red square on a blue background", num_steps=steps, progress=False)
    config = EditConfig.nonstyle(steps)
    ctx = EditContext.build(editor.components, editor.runner, config, editor.self_attn_layers, editor.embed(""),
                            editor.embed(inversion.source_prompt), editor.embed("a green square on a blue background"))
    return dict(name=request.param, editor=editor, image=image, inversion=inversion, ctx=ctx, steps=steps,
                guided=guided, unguided=unguided, rounds=rounds, size=size)


def _pair(s, step):
    z_star = s["inversion"].latents[s["steps"] - step]
    z = z_star + 0.05 * torch.randn(z_star.shape, generator=torch.Generator().manual_seed(step))
    return z, z_star


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_guided_step(benchmark, setup, record, mode):
    z, z_star = _pair(setup, setup["guided"])
    step_fn = STEP_FNS[mode]
    benchmark.pedantic(step_fn, args=(setup["ctx"], z, z_star, setup["guided"]), rounds=setup["rounds"], iterations=1, warmup_rounds=1)
    with LargestTensor() as largest:
        step_fn(setup["ctx"], z, z_star, setup["guided"])
    record(f"{setup['name']}: one guided step", mode, seconds=mean_seconds(benchmark),
           **{f"largest_tensor_MiB_{mode}": round(largest.bytes / 2**20, 1)})


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_unguided_step(benchmark, setup, record, mode):
    z, z_star = _pair(setup, setup["unguided"])
    benchmark.pedantic(STEP_FNS[mode], args=(setup["ctx"], z, z_star, setup["unguided"]), rounds=setup["rounds"], iterations=1, warmup_rounds=1)
    record(f"{setup['name']}: one unguided step", mode, seconds=mean_seconds(benchmark))


def test_inversion(benchmark, setup, record):
    editor = setup["editor"]
    benchmark.pedantic(editor.invert, args=(setup["image"], "a red square on a blue background"),
                       kwargs=dict(num_steps=setup["steps"], progress=False), rounds=1, iterations=1)
    record(f"{setup['name']}: inversion ({setup['steps']} steps)", "fast", seconds=mean_seconds(benchmark))


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_whole_edit(benchmark, setup, record, mode):
    editor = setup["editor"]
    rows = {}

    def run():
        before = editor.runner.rows
        editor.edit(setup["image"], "a green square on a blue background", source_prompt="a red square on a blue background",
                    num_steps=setup["steps"], mode=mode, progress=False)
        rows["n"] = editor.runner.rows - before

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(f"{setup['name']}: whole edit (incl. inversion)", mode, seconds=mean_seconds(benchmark),
           **{f"unet_rows_{mode}": rows["n"]})


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_repeat_edit(benchmark, setup, record, mode):
    editor, inversion = setup["editor"], setup["inversion"]
    target = "a yellow square on a blue background"
    editor.edit(inversion, target, mode=mode, progress=False)  # fills the fast mode's source cache
    rows = {}

    def run():
        before = editor.runner.rows
        editor.edit(inversion, target, mode=mode, progress=False)
        rows["n"] = editor.runner.rows - before

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(f"{setup['name']}: repeat edit (cached inversion)", mode, seconds=mean_seconds(benchmark),
           **{f"unet_rows_{mode}": rows["n"]})


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_peak_rss(setup, record, mode):
    rss = peak_rss_mb(setup["name"], mode, setup["steps"], setup["size"])
    record(f"{setup['name']}: edit peak RSS (MiB)", mode, seconds=None, **{f"{k}_{mode}": v for k, v in rss.items()})
