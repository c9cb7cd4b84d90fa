"""Plain UNet calls and whole edits: eager float32 vs ONNX Runtime (float32) vs bfloat16, one run
(issue 14, item 6). Every case alternates its variants round by round (:mod:`benchmarks.alternating`:
``--warmup`` untimed calls, then ``--rounds`` timed rounds A B C, C B A, …) and records each as a
ratio of medians to eager float32 measured in the same rounds.

    python -m pytest benchmarks/bench_runtime_onnx.py -s -k "plain and sd15_256"
    python -m pytest benchmarks/bench_runtime_onnx.py -s -k "edit and sd15_256" --rounds 2
    python -m pytest benchmarks/bench_runtime_onnx.py -s -k tiny --rounds 1 --warmup 0   # smoke run

Variants. Plain calls and the inversion (``test_plain_call``, ``test_inversion``): ``eager`` (a UNet
with diffusers' default attention processors, the graph the export holds), ``onnx`` (ONNX Runtime's
CPU provider on that export, made once per module), ``bf16`` (``torch.autocast("cpu",
torch.bfloat16)`` around the eager call; AVX-512 BF16 / AMX CPUs only), ``bf16-model`` (the UNet's
weights in bfloat16, inputs cast to it: the plain calls of ``Editor.from_pretrained(dtype=torch.bfloat16)``,
no per-call weight casts). A whole first edit
(``test_whole_first_edit``, ``Editor.edit`` of a fresh image, inversion included): ``eager``;
``onnx`` (``runtime="onnx"``: plain calls on ONNX Runtime); ``bf16-plain``
(``RuntimeConfig(plain_dtype=torch.bfloat16)``: plain calls under bf16 autocast, capturing and grad
calls float32); ``bf16-model`` (the UNet and text encoder in bfloat16 — every UNet call bf16 — with
latents, energies, gradients and γ float32 and the VAE float32, as docs/precision.md has it).
``GNR_BENCH_EDIT_VARIANTS=eager,bf16-model`` picks a subset (each adds one edit per round).

Models: ``tiny`` (test pipeline, 8² latent), ``bundled`` (16²), ``golden`` (32², needs ../shared),
``sd15_256`` (SD 1.5 architecture with random weights, 32² latent), ``sd15_512`` (64², plain calls
only). Edits on SD 1.5 run ``SD15_EDIT_STEPS`` steps (the cost per step is what matters), the
small models 10.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.alternating import alternate
from gnr_fast.fingerprint import unet_fingerprint
from gnr_fast.runtime.onnx.export import export_unet_onnx, fresh_unet
from gnr_fast.runtime.onnx.runner import OnnxPlainUNet
from gnr_fast.precision import cpu_has_bf16
from gnr_fast.schedules import ddim_step_up, ddim_timesteps

MODELS = {"tiny": 8, "bundled": 16, "golden": 32, "sd15_256": 32, "sd15_512": 64}  # name → latent side
PLAIN_ONLY = {"sd15_512"}
INVERSION_STEPS = 10
EDIT_STEPS = 10
SD15_EDIT_STEPS = 6
EDIT_VARIANTS = ("eager", "onnx", "bf16-plain", "bf16-model")


def load_model(name: str):
    """The float32 :class:`~gnr_fast.loading.Components` of a benchmark model."""
    from gnr_fast.loading import load_components

    if name == "tiny":
        from tiny_pipeline import build_tiny_pipeline

        return load_components(build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny"))
    if name == "bundled":
        return load_components(None)
    if name == "golden":
        from benchmarks.models import GOLDEN

        if not (GOLDEN / "tiny-sd").is_dir():
            pytest.skip(f"the golden model is not at {GOLDEN / 'tiny-sd'}")
        return load_components(GOLDEN / "tiny-sd")
    from benchmarks.models import sd15_editor

    return sd15_editor().components


def bf16_components(components):
    """``components`` with the UNet and text encoder(s) copied to bfloat16 (the VAE stays float32, as
    :func:`~gnr_fast.loading.load_components` keeps a ``force_upcast`` VAE)."""
    relaxed = components.relaxed_text_encoder
    return dataclasses.replace(
        components, unet=copy.deepcopy(components.unet).to(torch.bfloat16),
        text_encoder=copy.deepcopy(components.text_encoder).to(torch.bfloat16), dtype=torch.bfloat16, precision=None,
        relaxed_text_encoder=None if relaxed is None else copy.deepcopy(relaxed).to(torch.bfloat16),
    )


class Bench:
    """One model's plain runners (eager, bf16 autocast, ONNX Runtime made on first use)."""

    def __init__(self, name: str, export_root: Path) -> None:
        self.name = name
        self.latent = MODELS[name]
        self.components = load_model(name)
        self.export_root = export_root
        self.context = torch.randn(2, 77, self.components.unet.config.cross_attention_dim)
        self._onnx: OnnxPlainUNet | None = None

    @functools.cached_property
    def unet(self) -> torch.nn.Module:
        """A float32 copy with diffusers' default attention processors (made on first use: the
        whole-edit case needs none, and SD 1.5 copies are 3.4 GB)."""
        return fresh_unet(self.components.unet, torch.float32)

    @property
    def onnx(self) -> OnnxPlainUNet:
        if self._onnx is None:
            start = time.perf_counter()
            info, self.export_timings = export_unet_onnx(
                self.components.unet, self.export_root / self.name, latent_sizes=((self.latent, self.latent),),
                batch=(1, 4))
            self.export_s = time.perf_counter() - start
            self.external_data = info.external_data
            self._onnx = OnnxPlainUNet(unet_fingerprint(self.components.unet), exports=[self.export_root / self.name])
        return self._onnx

    @functools.cached_property
    def unet_bf16(self) -> torch.nn.Module:
        """The same UNet with bfloat16 weights: the plain calls of a bf16 model (``dtype=torch.bfloat16``)."""
        return fresh_unet(self.components.unet, torch.bfloat16)

    def runner(self, variant: str):
        if variant == "onnx":
            return self.onnx
        if variant == "bf16":
            return self.bf16
        if variant == "bf16-model":
            return self.bf16_model
        return self.eager

    def eager(self, latents, timestep, context):
        with torch.no_grad():
            return self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0]

    def bf16(self, latents, timestep, context):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0].float()

    def bf16_model(self, latents, timestep, context):
        with torch.no_grad():
            return self.unet_bf16(latents.bfloat16(), timestep, encoder_hidden_states=context.bfloat16(),
                                  return_dict=False)[0].float()


@pytest.fixture(scope="module", params=list(MODELS))
def bench(request, tmp_path_factory):
    return Bench(request.param, tmp_path_factory.mktemp("onnx-bench"))


def plain_variants() -> tuple[str, ...]:
    return ("eager", "onnx", "bf16", "bf16-model") if cpu_has_bf16() else ("eager", "onnx")


def record_against_eager(record, case: str, samples: dict, **extra) -> None:
    """One table row per non-eager variant: eager's samples as the reference, the variant's as fast."""
    for variant, s in samples.items():
        if variant != "eager":
            record(f"{case} {variant}", "reference", samples=samples["eager"])
            record(f"{case} {variant}", "fast", samples=s, **extra)


@pytest.mark.parametrize("rows", [1, 2])
def test_plain_call(benchmark, record, bench, rows, rounds, warmup):
    latents = torch.randn(rows, 4, bench.latent, bench.latent)
    t, context = torch.tensor(500), bench.context[:rows]
    runners = {v: bench.runner(v) for v in plain_variants()}
    calls = {v: (lambda r=r: r(latents, t, context)) for v, r in runners.items()}
    samples: dict = {}
    per_round = 2 if bench.name.startswith("sd15") else 20  # calls per timed sample (noise of single calls)

    def run():
        samples.update(alternate({v: (lambda c=c: [c() for _ in range(per_round)]) for v, c in calls.items()},
                                 rounds=rounds, warmup=warmup))

    benchmark.pedantic(run, rounds=1, iterations=1)
    record_against_eager(record, f"plain b{rows} {bench.name} (x{per_round} calls)", samples)


def test_inversion(benchmark, record, bench, rounds, warmup):
    if bench.name in PLAIN_ONLY:
        pytest.skip("plain calls only at this size")
    schedule = bench.components.schedule
    timesteps = ddim_timesteps(INVERSION_STEPS, schedule.num_train_timesteps)
    z0, c = torch.randn(1, 4, bench.latent, bench.latent), bench.context[:1]

    def invert(call) -> torch.Tensor:
        z = z0
        for t in reversed(timesteps):  # DESIGN.md §2: t = 0, 20, …
            z = ddim_step_up(schedule, call(z, torch.tensor(t), c), t, z, INVERSION_STEPS)
        return z

    samples: dict = {}
    runners = {v: bench.runner(v) for v in plain_variants()}
    variants = {v: (lambda r=r: invert(r)) for v, r in runners.items()}
    benchmark.pedantic(lambda: samples.update(alternate(variants, rounds=rounds, warmup=warmup)), rounds=1, iterations=1)
    record_against_eager(record, f"inversion {INVERSION_STEPS} steps {bench.name}", samples)


def test_export_time(record, bench):
    """Seconds of one export (trace, save, onnx.checker), measured when the module's export ran."""
    bench.onnx  # noqa: B018 (exports on first use)
    t = bench.export_timings
    record(f"export {bench.name}", "fast", seconds=bench.export_s, trace_s=round(t.trace_s, 2),
           save_s=round(t.save_s, 2), check_s=round(t.check_s, 2), external_data=bench.external_data)


def edit_variants() -> tuple[str, ...]:
    chosen = os.environ.get("GNR_BENCH_EDIT_VARIANTS")
    names = tuple(v.strip() for v in chosen.split(",")) if chosen else EDIT_VARIANTS
    unknown = [v for v in names if v not in EDIT_VARIANTS]
    if unknown or "eager" not in names:
        raise ValueError(f"GNR_BENCH_EDIT_VARIANTS must list 'eager' and some of {EDIT_VARIANTS}, got {chosen!r}")
    return tuple(v for v in names if cpu_has_bf16() or not v.startswith("bf16"))


def make_editor(components, variant: str, cache_dir: Path):
    from gnr_fast import Editor
    from gnr_fast.runtime import RuntimeConfig

    if variant == "eager":  # float32 plain calls whatever plain_dtype="auto" would choose
        return Editor(components, runtime=RuntimeConfig(plain_dtype=None))
    if variant == "onnx":
        return Editor(components, runtime=RuntimeConfig("onnx", "eager", export_cache_dir=cache_dir))
    if variant == "bf16-plain":
        return Editor(components, runtime=RuntimeConfig(plain_dtype=torch.bfloat16))
    return Editor(bf16_components(components))


def test_whole_first_edit(benchmark, record, bench, rounds, warmup, tmp_path):
    if bench.name in PLAIN_ONLY:
        pytest.skip("plain calls only at this size")
    from PIL import Image

    steps = SD15_EDIT_STEPS if bench.name.startswith("sd15") else EDIT_STEPS
    editors = {v: make_editor(bench.components, v, tmp_path / "onnx-cache") for v in edit_variants()}
    side = 8 * bench.latent
    config = editors["eager"].resolve_config("nonstyle", num_steps=steps)
    counter = iter(range(10**6))

    def edit(editor):
        image = Image.new("RGB", (side, side), (40, 60, next(counter) % 256))  # never a cached inversion
        return editor.edit(image, "a green circle", source_prompt="a red circle", config=config, progress=False)

    samples: dict = {}
    variants = {v: (lambda e=e: edit(e)) for v, e in editors.items()}
    benchmark.pedantic(lambda: samples.update(alternate(variants, rounds=rounds, warmup=warmup)), rounds=1, iterations=1)
    record_against_eager(record, f"first edit {steps} steps {bench.name}", samples)
