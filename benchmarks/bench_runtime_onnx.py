"""Plain UNet calls: eager PyTorch vs ONNX Runtime (float32) vs bfloat16 autocast, one run (issue 14, item 6).

    OMP_NUM_THREADS=2 python -m pytest benchmarks/bench_runtime_onnx.py -s -k "bundled or golden"
    python -m pytest benchmarks/bench_runtime_onnx.py -s -k sd15_256      # SD 1.5 architecture, 256²
    python -m pytest benchmarks/bench_runtime_onnx.py -s -k tiny --benchmark-disable   # smoke run

Cases (each a ratio to eager float32 in the same run, "reference" column = eager):
plain call at batch 1 and 2, a 10-step DDIM inversion (batch-1 plain calls + the DDIM update),
the export itself (seconds, once), and a whole first edit through ``Editor(runtime=...)`` where
the editor takes a runtime (the execution core, issue 13). Eager calls use a UNet with diffusers'
default attention processors, the same graph the export holds. Models: ``tiny`` (test pipeline,
8² latent), ``bundled`` (16²), ``golden`` (32², needs ../shared), ``sd15_256`` (SD 1.5
architecture, random weights, 32²) and ``sd15_512`` (64², plain calls only).
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.conftest import mean_seconds
from gnr_fast.exporting.info import unet_fingerprint
from gnr_fast.exporting.onnx import export_unet_onnx, fresh_unet
from gnr_fast.runtime.onnx import OnnxPlainUNet
from gnr_fast.runtime.precision import cpu_has_bf16
from gnr_fast.schedules import ddim_step_up, ddim_timesteps

MODELS = {"tiny": 8, "bundled": 16, "golden": 32, "sd15_256": 32, "sd15_512": 64}  # name → latent side
PLAIN_ONLY = {"sd15_512"}
INVERSION_STEPS = 10


def load_model(name: str):
    """(components or None, diffusers UNet) of a benchmark model."""
    from gnr_fast.loading import load_components

    if name == "tiny":
        from tiny_pipeline import build_tiny_pipeline

        components = load_components(build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny"))
    elif name == "bundled":
        components = load_components(None)
    elif name == "golden":
        from benchmarks.models import GOLDEN

        if not (GOLDEN / "tiny-sd").is_dir():
            pytest.skip(f"the golden model is not at {GOLDEN / 'tiny-sd'}")
        components = load_components(GOLDEN / "tiny-sd")
    else:
        from benchmarks.models import sd15_editor

        components = sd15_editor().components
    return components


class Bench:
    """One model's eager and ONNX plain runners, built once per module."""

    def __init__(self, name: str, export_root: Path) -> None:
        self.name = name
        self.latent = MODELS[name]
        self.components = load_model(name)
        self.unet = fresh_unet(self.components.unet, torch.float32)
        start = time.perf_counter()
        info, self.export_timings = export_unet_onnx(
            self.components.unet, export_root / name, latent_sizes=((self.latent, self.latent),), batch=(1, 4))
        self.export_s = time.perf_counter() - start
        self.external_data = info.external_data
        self.onnx = OnnxPlainUNet(unet_fingerprint(self.components.unet), exports=[export_root / name])
        self.context = torch.randn(2, 77, self.components.unet.config.cross_attention_dim)

    def eager(self, latents, timestep, context):
        with torch.no_grad():
            return self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0]

    def bf16(self, latents, timestep, context):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0].float()


@pytest.fixture(scope="module", params=list(MODELS))
def bench(request, tmp_path_factory):
    return Bench(request.param, tmp_path_factory.mktemp("onnx-bench"))


RUNNERS = ("eager", "onnx", "bf16")  # eager runs first: the others are recorded as ratios to it
EAGER_S: dict[str, float] = {}


def record_ratio(record, case: str, runner: str, seconds: float) -> None:
    """Eager is the reference of ``case``; every other runner a row of its own against it."""
    if runner == "eager":
        EAGER_S[case] = seconds
        return
    record(f"{case} {runner}", "reference", seconds=EAGER_S.get(case))
    record(f"{case} {runner}", "fast", seconds=seconds)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("rows", [1, 2])
def test_plain_call(benchmark, record, bench, runner, rows):
    if runner == "bf16" and not cpu_has_bf16():
        pytest.skip("no AVX-512 BF16 / AMX on this CPU")
    call = getattr(bench, runner)
    latents = torch.randn(rows, 4, bench.latent, bench.latent)
    t, context = torch.tensor(500), bench.context[:rows]
    benchmark.pedantic(call, args=(latents, t, context), rounds=5 if bench.name.startswith("sd15") else 20,
                       warmup_rounds=1)
    if benchmark.stats is not None:
        record_ratio(record, f"plain b{rows} {bench.name}", runner, mean_seconds(benchmark))


@pytest.mark.parametrize("runner", RUNNERS)
def test_inversion(benchmark, record, bench, runner):
    if bench.name in PLAIN_ONLY:
        pytest.skip("plain calls only at this size")
    if runner == "bf16" and not cpu_has_bf16():
        pytest.skip("no AVX-512 BF16 / AMX on this CPU")
    call, schedule = getattr(bench, runner), bench.components.schedule
    timesteps = ddim_timesteps(INVERSION_STEPS, schedule.num_train_timesteps)
    z0, c = torch.randn(1, 4, bench.latent, bench.latent), bench.context[:1]

    def invert() -> torch.Tensor:
        z = z0
        for t in reversed(timesteps):  # DESIGN.md §2: t = 0, 20, …
            z = ddim_step_up(schedule, call(z, torch.tensor(t), c), t, z, INVERSION_STEPS)
        return z

    benchmark.pedantic(invert, rounds=3, warmup_rounds=1)
    if benchmark.stats is not None:
        record_ratio(record, f"inversion {INVERSION_STEPS} steps {bench.name}", runner, mean_seconds(benchmark))


def test_export_time(record, bench):
    """Seconds of one export (trace, save, onnx.checker), measured when the module's export ran."""
    t = bench.export_timings
    record(f"export {bench.name}", "fast", seconds=bench.export_s, trace_s=round(t.trace_s, 2),
           save_s=round(t.save_s, 2), check_s=round(t.check_s, 2), external_data=bench.external_data)


def editor_takes_runtime() -> bool:
    from gnr_fast import Editor

    return "runtime" in inspect.signature(Editor.__init__).parameters


@pytest.mark.parametrize("runtime", ["eager", "onnx"])
def test_whole_first_edit(benchmark, record, bench, runtime):
    if bench.name in PLAIN_ONLY or bench.name.startswith("sd15"):
        pytest.skip("whole edits on the small models only (SD 1.5: bench_paper_timing.py)")
    if not editor_takes_runtime():
        pytest.skip("Editor(runtime=...) arrives with the execution core (issue 13)")
    from PIL import Image

    from gnr_fast import Editor

    editor = Editor(bench.components, runtime=runtime)
    side = 8 * bench.latent
    config = editor.resolve_config("nonstyle", num_steps=10)
    counter = iter(range(10**6))

    def edit():
        image = Image.new("RGB", (side, side), (40, 60, next(counter) % 256))  # never a cached inversion
        return editor.edit(image, "a green circle", source_prompt="a red circle", config=config, progress=False)

    benchmark.pedantic(edit, rounds=2, warmup_rounds=1)
    if benchmark.stats is not None:
        record_ratio(record, f"first edit 10 steps {bench.name}", runtime, mean_seconds(benchmark))
