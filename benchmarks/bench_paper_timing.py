"""A whole edit at the paper's setting next to the paper's Table 1 (issue 14, item 7).

The setting: SD 1.x architecture, 512² images (64² latents), 50 DDIM steps, the non-stylisation
preset, inversion included (DESIGN.md §6–7). Paper Table 1 (A100, seconds per edit incl.
inversion): GaR 24.26, P2P+NPI 8.54, MasaCtrl 13.73, EDICT 68.13, PnP 197.0.

* On CUDA it runs for real: one warm-up edit, then one timed edit per runtime, and prints the
  GPU's name.
* On CPU a whole edit of the SD 1.5 UNet takes many minutes, so it **estimates**: it times the
  VAE encode, one inversion step and one step of each kind that ``plan_edit`` holds (via
  ``bench_repeat_speedup.estimate``), plus one decode, and sums them as the plan says
  (encode + 50 inversion steps + Σ planned steps + decode). The output says which it did.
* ``--sampler consistency``: the few-step edit of issue 34 (4 inversion + 4 editing steps, preset
  ``consistency``) on the same architecture with a guidance embedding and random LoRAs fused into
  a reverse and a forward UNet (``benchmarks.models.sd15_consistency_editor``). Short enough to
  run for real on CPU too: one whole edit per runtime (after a warm-up edit on CUDA only).

    python benchmarks/bench_paper_timing.py                       # SD 1.5 architecture, random weights
    python benchmarks/bench_paper_timing.py --model PATH --device cuda   # a real SD 1.x checkpoint on a GPU
    python benchmarks/bench_paper_timing.py --sampler consistency --runtime eager   # 4+4 steps, measured
    python benchmarks/bench_paper_timing.py --latent 8 --steps 4 --model tiny   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.bench_repeat_speedup import SOURCE, TARGET, estimate
from gnr_fast import Editor
from gnr_fast.config import CONSISTENCY_STEPS
from gnr_fast.images import decode_latent

PAPER_TABLE_1 = {  # seconds per edit incl. inversion, A100 (DESIGN.md §7)
    "GaR (paper)": 24.26, "P2P+NPI": 8.54, "ProxMasaCtrl": 12.94, "MasaCtrl": 13.73, "P2P+NTI": 66.77,
    "EDICT": 68.13, "PnP": 197.0,
}
RUNTIMES = ("eager", "compiled", "onnx")


def available_runtimes() -> tuple[str, ...]:
    """Every runtime when the editor takes ``runtime=`` (the execution core), else eager alone."""
    return RUNTIMES if "runtime" in inspect.signature(Editor.__init__).parameters else ("eager",)


def components_for(model: str, device: str):
    from gnr_fast.loading import load_components

    if model == "sd15":
        from benchmarks.models import sd15_editor

        components = sd15_editor().components
        if device != "cpu":
            for module in (components.unet, components.vae, components.text_encoder):
                module.to(device)
            components = dataclasses.replace(components, device=torch.device(device))
        return components
    if model == "tiny":
        from tiny_pipeline import build_tiny_pipeline

        return load_components(build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny"), device=device)
    return load_components(model, device=device)


def editor_for(components, runtime: str, sampler: str = "ddim") -> Editor:
    """An editor over ``components`` on ``runtime``; ``sampler="consistency"``: the few-step editor
    of :func:`benchmarks.models.sd15_consistency_editor` (SD 1.5 architecture only)."""
    if sampler == "consistency":
        from benchmarks.models import sd15_consistency_editor

        return sd15_consistency_editor(components, runtime=None if runtime == "eager" else runtime)
    return Editor(components) if runtime == "eager" else Editor(components, runtime=runtime)


def timed_edit(editor: Editor, latent: int, steps: int, preset: str = "nonstyle", warm_up: bool = True) -> float:
    """Seconds of one real edit (inversion, editing and decoding), synchronised on CUDA; one untimed
    edit of another image first when ``warm_up``."""
    from PIL import Image, ImageDraw

    side = 8 * latent
    image = Image.new("RGB", (side, side), (40, 60, 200))
    ImageDraw.Draw(image).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(220, 30, 30))
    config = editor.resolve_config(preset, num_steps=steps)
    if warm_up:
        editor.edit(image, TARGET, source_prompt=SOURCE, config=config, progress=False)
    image.putpixel((0, 0), (1, 2, 3))  # another image: nothing cached
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    editor.edit(image, TARGET, source_prompt=SOURCE, config=config, progress=False)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return time.perf_counter() - start


def estimated_edit(editor: Editor, latent: int, steps: int, repeats: int) -> float:
    """Seconds of one edit summed from timed steps as ``plan_edit`` lays them out, plus a decode."""
    components = editor.components
    result = estimate(editor, editor.resolve_config("nonstyle", num_steps=steps), latent, repeats)
    z = torch.randn(1, 4, latent, latent, dtype=components.dtype, device=components.device)
    start = time.perf_counter()
    decode_latent(components.vae, z, components.scaling_factor)
    return result.first_s + (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15", help="'sd15' (architecture, random weights), 'tiny', or a folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", type=int, default=64, help="latent side (default 64: 512² images)")
    parser.add_argument("--steps", type=int, default=None, help="steps (default 50; 4 with --sampler consistency)")
    parser.add_argument("--sampler", choices=("ddim", "consistency"), default="ddim",
                        help="'consistency': the 4+4-step edit on the architecture with a guidance embedding and "
                             "random LoRAs (model sd15 only)")
    parser.add_argument("--runtime", action="append", choices=RUNTIMES, help="runtimes to time (default: all available)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per step kind on CPU (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    consistency = args.sampler == "consistency"
    if consistency and args.model != "sd15":
        parser.error("--sampler consistency builds its models from the SD 1.5 architecture: use --model sd15")
    steps = args.steps or (CONSISTENCY_STEPS if consistency else 50)
    preset = "consistency" if consistency else "nonstyle"
    if args.threads:
        torch.set_num_threads(args.threads)
    runtimes = tuple(args.runtime or available_runtimes())
    components = components_for(args.model, args.device)
    cuda = components.device.type == "cuda"
    real = cuda or consistency
    where = torch.cuda.get_device_name(components.device) if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    how = ("measured: one whole edit per runtime after a warm-up" if cuda else
           "measured: one whole edit per runtime (no warm-up edit on CPU)" if real else
           "ESTIMATED: each step kind of the plan timed once and summed as plan_edit says "
           "(encode + inversion steps + planned steps + decode); not a whole run")
    print(f"model {args.model}{' + guidance embedding, random LoRAs' if consistency else ''}, {8 * args.latent}² images, "
          f"{steps} steps, preset {preset}, on {where}")
    print(f"{how}; {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| method | seconds per edit (incl. inversion) | hardware |")
    print("| --- | --- | --- |")
    for runtime in runtimes:
        editor = editor_for(components, runtime, args.sampler)
        seconds = (timed_edit(editor, args.latent, steps, preset, warm_up=cuda) if real
                   else estimated_edit(editor, args.latent, steps, args.repeats))
        plain = editor.runner.runtime.plain_dtype  # "auto" resolved for this UNet (gnr_fast.precision)
        label = (f"{'consistency 4+4, ' if consistency else ''}runtime {runtime}, "
                 f"plain calls {str(plain or components.dtype).removeprefix('torch.')}")
        print(f"| gnr-fast, {label}{'' if real else ' (estimate)'} | {seconds:.2f} | {where} |", flush=True)
    for method, seconds in PAPER_TABLE_1.items():
        print(f"| {method} | {seconds:.2f} | A100 (paper Table 1) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
