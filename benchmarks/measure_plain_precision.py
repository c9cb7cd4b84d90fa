"""How much accuracy low-precision plain calls cost (issue 14, item 4): ε error per call and the
inversion's reconstruction PSNR, bfloat16 autocast (CPU) / float16 autocast (CUDA) vs float32.

    python benchmarks/measure_plain_precision.py --model bundled --images 3 --steps 50
    python benchmarks/measure_plain_precision.py --model tiny --images 2 --steps 10

For each image (shapes-world scenes with their captions as source prompts): the DDIM inversion
with float32 plain calls, then with low-precision plain calls, then the unguided DDIM
reconstruction back from each inversion's last latent (plain calls under the source prompt, the
same precision), decoded. Reported: the relative ε error of every plain call of the
low-precision inversion against float32 on the same inputs (median, max), the final inverted
latent's relative difference, and the reconstruction PSNR against the input image for both
precisions (the VAE round trip bounds both). Not a pytest benchmark: a one-shot measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from gnr_fast.images import decode_latent, encode_latent
from gnr_fast.loading import load_components
from gnr_fast.prompts import encode_prompt
from gnr_fast.schedules import ddim_step_down, ddim_step_up, ddim_timesteps


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def plain_call(unet, device_type: str, dtype: torch.dtype | None):
    """ε(z, t, c) float32, under autocast to ``dtype`` when given (the AutocastPlainRunner recipe)."""

    def call(z: torch.Tensor, t: int, c: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return unet(z, torch.tensor(t), encoder_hidden_states=c, return_dict=False)[0].float()

    return call


def scenes(count: int, size: int):
    from gnr_shapes.world.scenes import render, sample_spec

    rng = np.random.default_rng(0)
    return [render(sample_spec(rng), size) for _ in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled", help="'bundled', 'tiny' or a diffusers folder")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=None, help="image side (default: 128 bundled, 64 tiny)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    if args.model == "tiny":
        from tiny_pipeline import build_tiny_pipeline

        path = build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny")
    else:
        path = None if args.model == "bundled" else args.model
    size = args.size or (64 if args.model == "tiny" else 128)
    components = load_components(path, device=args.device)
    device_type = components.device.type
    low = torch.bfloat16 if device_type == "cpu" else torch.float16
    fp32, lowp = plain_call(components.unet, device_type, None), plain_call(components.unet, device_type, low)
    schedule, steps = components.schedule, args.steps
    timesteps = ddim_timesteps(steps, schedule.num_train_timesteps)

    print(f"model {args.model} ({components.model_id}), {size}² images, {steps} steps, {low} autocast vs float32, "
          f"torch threads {torch.get_num_threads()}")
    print("| image | ε rel err median | ε rel err max | z_T rel diff | PSNR fp32 | PSNR low | PSNR low vs fp32 recon |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for index, scene in enumerate(scenes(args.images, size)):
        pixels = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        c = encode_prompt(components, scene.caption)
        with torch.no_grad():
            z0 = encode_latent(components.vae, pixels, components.scaling_factor)
        errors, finals, recon = [], {}, {}
        for name, call in (("fp32", fp32), ("low", lowp)):
            z = z0
            for i in range(steps):  # DESIGN.md §2: upward, t = 0, 20, …
                t = timesteps[steps - 1 - i]
                eps = call(z, t, c)
                if name == "low":
                    errors.append(rel(eps, fp32(z, t, c)))
                z = ddim_step_up(schedule, eps, t, z, steps)
            finals[name] = z
            for t in timesteps:  # unguided reconstruction, DESIGN.md §3 step 8 with ε = ε(z, t, c_src)
                z = ddim_step_down(schedule, call(z, t, c), t, z, steps)
            recon[name] = decode_latent(components.vae, z, components.scaling_factor)[0]
        print(f"| {index} | {statistics.median(errors):.2e} | {max(errors):.2e} | {rel(finals['low'], finals['fp32']):.2e} "
              f"| {psnr(recon['fp32'], scene.image):.2f} dB | {psnr(recon['low'], scene.image):.2f} dB "
              f"| {psnr(recon['low'], recon['fp32']):.2f} dB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
