"""Eager vs compiled runtime, side by side in one run (issue 13): UNet calls, inversion, edits, compile time.

Run (the lead's measured run, idle machine)::

    GNR_BENCH_MODELS=bundled,golden python -m pytest benchmarks/bench_runtime.py --benchmark-only -s

Environment: ``GNR_BENCH_MODELS`` (comma list of ``tiny``, ``bundled`` (128²), ``golden`` (256²),
``sd15`` (SD 1.5 architecture, random weights, 256²); default ``tiny``), ``GNR_BENCH_ROUNDS``
(timed rounds per variant, default 5), ``GNR_BENCH_STEPS`` (DDIM steps of the edit cases,
default 10), ``GNR_BENCH_WARMUP`` (untimed rounds per variant first, default 1; compiled variants
compile there), ``GNR_BENCH_COMPILER`` (``inductor``; ``aot_eager`` for a smoke run), ``GNR_BENCH_INDUCTOR_CACHE``
(the timed editors' inductor cache folder; default inductor's own), ``GNR_BENCH_FREEZING``,
``GNR_BENCH_CPP_WRAPPER``, ``GNR_BENCH_GUARD_MODULES`` (0/1) and ``GNR_BENCH_COMPILE_MODE`` (override the preset). A smoke run:
``GNR_BENCH_ROUNDS=1 GNR_BENCH_STEPS=2 GNR_BENCH_COMPILER=aot_eager ... --benchmark-disable``.

Every case times its variants alternately (eager, compiled, eager, compiled, ...) after the
warm-up, so both see the same machine state; the table reports median and min–max per variant and
the ratio of medians (eager / compiled) from the same run. Compile time: the first call of a fresh
compiled editor with an empty inductor cache (cold), then again after ``torch._dynamo.reset()``
with the filled cache (warm: dynamo traces again, inductor loads its artefacts from disk).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.models import golden_editor, sd15_editor
from gnr_fast import Editor
from gnr_fast.attention import CaptureSpec
from gnr_fast.config import FeatureSite
from gnr_fast.runtime import RuntimeConfig, inductor_unavailable_reason

ROUNDS = int(os.environ.get("GNR_BENCH_ROUNDS", "5"))
WARMUP = int(os.environ.get("GNR_BENCH_WARMUP", "1"))
STEPS = int(os.environ.get("GNR_BENCH_STEPS", "10"))
MODELS = [m for m in os.environ.get("GNR_BENCH_MODELS", "tiny").split(",") if m]
COMPILER = os.environ.get("GNR_BENCH_COMPILER", "inductor")  # "aot_eager": a smoke run without code generation
CACHE = Path(os.environ["GNR_BENCH_INDUCTOR_CACHE"]) if os.environ.get("GNR_BENCH_INDUCTOR_CACHE") else None


def _compiled(cache_dir: Path | None = None) -> RuntimeConfig:
    """The ``compiled`` preset with this run's compiler, cache folder and option overrides
    (``GNR_BENCH_FREEZING``/``GNR_BENCH_CPP_WRAPPER``/``GNR_BENCH_GUARD_MODULES`` = 0/1,
    ``GNR_BENCH_COMPILE_MODE``)."""
    options: dict = {"compiler": COMPILER, "cache_dir": cache_dir}
    for name in ("freezing", "cpp_wrapper", "guard_modules"):
        value = os.environ.get(f"GNR_BENCH_{name.upper()}")
        if value is not None:
            options[name] = value == "1"
    if os.environ.get("GNR_BENCH_COMPILE_MODE"):
        options["compile_mode"] = os.environ["GNR_BENCH_COMPILE_MODE"]
    return replace(RuntimeConfig.preset("compiled"), **options)


RUNTIMES = ("eager", "compiled")


def _tiny_path() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_pipeline import build_tiny_pipeline

    root = Path(tempfile.gettempdir()) / "gnr-bench-tiny-sd"
    return root if (root / "model_index.json").is_file() else build_tiny_pipeline(root)


def _load(model: str, runtime: RuntimeConfig) -> tuple[Editor, int]:
    """An editor of ``model`` on ``runtime`` and the model's image size."""
    if model == "tiny":
        return Editor.from_pretrained(_tiny_path(), runtime=runtime), 64
    if model == "bundled":
        return Editor.from_pretrained(None, runtime=runtime), 128
    if model == "golden":
        editor = golden_editor()
        if editor is None:
            pytest.skip("golden model not found (shared/golden is absent)")
        return Editor(editor.components, runtime=runtime), 256
    if model == "sd15":
        return Editor(sd15_editor().components, runtime=runtime), 256
    raise ValueError(f"unknown benchmark model {model!r}")


RESULTS: dict[str, dict[str, dict]] = {}
OUT = Path(__file__).parent / "results" / "runtime.json"


def _record(case: str, times: dict[str, list[float]], **extra) -> None:
    """Median and min–max per variant into this run's table (printed and written at the end)."""
    for name, values in times.items():
        RESULTS.setdefault(case, {})[name] = {
            "seconds": statistics.median(values), "min_s": min(values), "max_s": max(values), "rounds": len(values),
            **extra}


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    if not RESULTS:
        return
    lines = ["", "gnr-fast runtime benchmark (median [min-max] seconds; ratio = eager (or guarded) / compiled, same run)"]
    for case, variants in RESULTS.items():
        cells = [f"{name} {v['seconds']:.4f} [{v.get('min_s', v['seconds']):.4f}-{v.get('max_s', v['seconds']):.4f}]"
                 for name, v in variants.items()]
        ratio = ""
        if "eager" in variants and "compiled" in variants:
            ratio = f"  {variants['eager']['seconds'] / variants['compiled']['seconds']:.2f}x"
        elif "guarded" in variants and "compiled" in variants:
            ratio = f"  {variants['guarded']['seconds'] / variants['compiled']['seconds']:.2f}x"
        lines.append(f"{case:<52} " + "  ".join(cells) + ratio)
    print("\n".join(lines))
    import json

    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": RESULTS}, indent=2))


def alternate(variants: dict[str, Callable[[], object]], rounds: int = ROUNDS, warmup: int = WARMUP) -> dict[str, list[float]]:
    """Warm each variant up, then time them alternately (A B A B …), ``rounds`` each."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


@pytest.fixture(scope="module", params=MODELS)
def editors(request):
    reason = inductor_unavailable_reason("cpu")
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    eager, size = _load(request.param, RuntimeConfig.preset("eager"))
    compiled = Editor(eager.components, runtime=_compiled(CACHE))
    image = Image.new("RGB", (size, size), (40, 60, 200))
    image.paste((220, 30, 30), (size // 4, size // 4, size // 2, size // 2))
    return {"name": request.param, "eager": eager, "compiled": compiled, "image": image, "size": size}


def _latent(setup, batch: int) -> torch.Tensor:
    h = setup["size"] // setup["eager"].components.latent_factor
    return torch.randn(batch, 4, h, h, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("batch", [1, 2])
def test_plain_call(benchmark, editors, batch):
    z, t = _latent(editors, batch), torch.tensor(500)
    context = editors["eager"].embed("a photo")

    def call(editor):
        with torch.no_grad():
            return editor.runner.plain(z, t, context)

    times = {}
    benchmark.pedantic(lambda: times.update(alternate({r: lambda r=r: call(editors[r]) for r in RUNTIMES})), rounds=1)
    _record(f"{editors['name']}: plain call, batch {batch}", times)


def test_module_guard_overhead(benchmark, editors):
    """What dynamo's guards on the UNet's modules cost per compiled call: plain batch-1 calls of the
    compiled editor (``guard_modules=False``, the default) and of one that keeps those guards."""
    z, t = _latent(editors, 1), torch.tensor(500)
    context = editors["eager"].embed("a photo")
    guarded = Editor(editors["eager"].components, runtime=replace(_compiled(CACHE), guard_modules=True))
    variants = {"compiled": editors["compiled"], "guarded": guarded}

    def call(editor):
        with torch.no_grad():
            return editor.runner.plain(z, t, context)

    times = {}
    benchmark.pedantic(lambda: times.update(alternate({n: lambda e=e: call(e) for n, e in variants.items()})), rounds=1)
    _record(f"{editors['name']}: plain call, batch 1, module guards off / on", times)


def test_capturing_call(benchmark, editors):
    """The first edit's no-grad call: (ε_u, ε_trg, source row with Q, K, lse and features)."""
    z, t = _latent(editors, 3), torch.tensor(500)
    context = editors["eager"].embed("a photo")
    layers = frozenset(range(len(editors["eager"].runner.layers)))
    spec = CaptureSpec(layers, frozenset({FeatureSite.UP_LAST}), rows=(2,), with_lse=True)

    def call(editor):
        with torch.no_grad():
            return editor.runner.capture(z, t, context, spec)

    times = {}
    benchmark.pedantic(lambda: times.update(alternate({r: lambda r=r: call(editors[r]) for r in RUNTIMES})), rounds=1)
    _record(f"{editors['name']}: capturing call, batch 3", times)


def test_grad_call_and_backward(benchmark, editors):
    """The grad call (Q, K and features of every layer) and the backward of an energy to the latent."""
    z, t = _latent(editors, 1), torch.tensor(500)
    context = editors["eager"].embed("a photo")
    layers = frozenset(range(len(editors["eager"].runner.layers)))
    spec = CaptureSpec(layers, frozenset({FeatureSite.UP_LAST}), rows=(0,))

    def call(editor):
        latents = z.clone().requires_grad_(True)
        with torch.enable_grad():
            _, (cur,) = editor.runner.capture(latents, t, context, spec)
            energy = sum(q.square().mean() for q in cur.queries.values()) + cur.features[FeatureSite.UP_LAST].abs().mean()
            return torch.autograd.grad(energy, latents)[0]

    times = {}
    benchmark.pedantic(lambda: times.update(alternate({r: lambda r=r: call(editors[r]) for r in RUNTIMES})), rounds=1)
    _record(f"{editors['name']}: grad call + backward, batch 1", times)


def test_inversion(benchmark, editors):
    def run(editor):
        return editor.invert(editors["image"], "a red square on a blue background", num_steps=STEPS, progress=False)

    times = {}
    benchmark.pedantic(lambda: times.update(alternate({r: lambda r=r: run(editors[r]) for r in RUNTIMES})), rounds=1)
    _record(f"{editors['name']}: inversion, {STEPS} steps", times)


@pytest.mark.parametrize("repeat", [False, True], ids=["first-edit", "repeat-edit"])
def test_whole_edit(benchmark, editors, repeat):
    """A whole edit from the image (first) or of a cached inversion (repeat: source pass cached)."""
    inversions = {r: editors[r].invert(editors["image"], "a red square on a blue background", num_steps=STEPS,
                                       progress=False) for r in RUNTIMES}

    def run(runtime):
        editor = editors[runtime]
        if repeat:
            return editor.edit(inversions[runtime], "a green square on a blue background", progress=False)
        return editor.edit(editors["image"], "a green square on a blue background",
                           source_prompt="a red square on a blue background", num_steps=STEPS, progress=False)

    times = {}
    benchmark.pedantic(lambda: times.update(alternate({r: lambda r=r: run(r) for r in RUNTIMES})), rounds=1)
    _record(f"{editors['name']}: {'repeat' if repeat else 'first'} edit, {STEPS} steps", times,
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))  # process peak so far


def test_compile_time(benchmark, editors, tmp_path):
    """First-edit latency of a fresh compiled editor: cold (empty inductor cache), then warm."""
    components = editors["eager"].components
    config = _compiled(tmp_path / "inductor")
    times: dict[str, list[float]] = {"cold": [], "warm": []}

    def first_edit(kind: str) -> None:
        torch._dynamo.reset()
        editor = Editor(components, runtime=config)
        start = time.perf_counter()
        editor.edit(editors["image"], "a green square", source_prompt="a red square", num_steps=STEPS, progress=False)
        times[kind].append(time.perf_counter() - start)

    benchmark.pedantic(lambda: (first_edit("cold"), first_edit("warm")), rounds=1)
    for kind, values in times.items():
        _record(f"{editors['name']}: compiled first edit ({kind} cache), {STEPS} steps", {"compiled": values})
