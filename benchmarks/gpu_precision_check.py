"""The GPU check of docs/precision.md §9: one edit per dtype on a CUDA device, compared with float32.

Nothing in this project has run on a GPU. With one, run (from the repository root):

    python benchmarks/gpu_precision_check.py --model path/to/stable-diffusion-v1-5 --out gpu-check
    python benchmarks/gpu_precision_check.py --model sd15-random --out gpu-check-random   # no weights needed

and paste ``gpu-check/report.json`` into docs/precision.md §9. For every dtype (float32, float16,
bfloat16) it inverts and edits one 512² image (``--size``) in fast and reference mode and records:
whether the latents are finite, the judge-free quality numbers against float32 (image PSNR, final
latent's relative distance, the first guided step's guider gradient: relative L2 distance and
cosine), the wall-clock phase timings (``EditResult.timings``, synchronised), peak device memory,
and how often the float16 loss scale backed off and the VAE retried in float32 (both logged as
warnings; none expected).
``sd15-random`` is SD 1.5's exact architecture with random weights (benchmarks/models.py): its
numbers say nothing about edit quality, only about finiteness, speed and memory.
Runs on CPU too (``--device cpu --size 128 --steps 4``): a smoke run of this script, nothing more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Warnings(logging.Handler):
    """Counts the precision policy's warnings: loss-scale back-offs and VAE float32 retries."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.backoffs = 0
        self.vae_retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.backoffs += "loss-scaled gradient overflowed" in message
        self.vae_retries += "retrying in float32" in message


def make_editor(model: str, device: str, dtype: torch.dtype):
    from gnr_fast import Editor

    if model != "sd15-random":
        return Editor.from_pretrained(None if model == "bundled" else model, device=device, dtype=dtype)
    from benchmarks.models import sd15_editor
    from gnr_fast.precision import PrecisionPolicy

    cpu = sd15_editor().components
    policy = PrecisionPolicy(model_dtype=dtype)
    components = dataclasses.replace(
        cpu, unet=cpu.unet.to(device, dtype), text_encoder=cpu.text_encoder.to(device, dtype),
        vae=cpu.vae.to(device, policy.vae_dtype(True)), device=torch.device(device), dtype=dtype, precision=policy,
    )
    return Editor(components)


def run(args: argparse.Namespace) -> dict:
    from gnr_shapes.evaluation.cases import make_case
    from gnr_shapes.evaluation.metrics import masked_psnr

    case = make_case("colour", 9_000_000, size=args.size)
    warnings = _Warnings()
    logging.getLogger("gnr_fast").addHandler(warnings)
    cuda = torch.device(args.device).type == "cuda"
    report: dict = {"device": torch.cuda.get_device_name(args.device) if cuda else args.device,
                    "torch": torch.__version__, "model": args.model, "size": args.size, "steps": args.steps, "runs": []}
    fp32: dict[str, tuple] = {}
    for name in args.dtypes:
        editor = make_editor(args.model, args.device, DTYPES[name])
        for mode in ("fast", "reference"):
            warnings.backoffs = warnings.vae_retries = 0
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            grads: dict[int, torch.Tensor] = {}

            def record(step, t, z, terms, grads=grads):
                if terms.guider_grad is not None and not grads:
                    grads[step] = terms.guider_grad.detach().double().cpu()

            start = time.perf_counter()
            inversion = editor.invert(case.source.image, case.source.caption, num_steps=args.steps, progress=False)
            result = editor.edit(inversion, case.target.caption, preset=args.preset, mode=mode, progress=False,
                                 callback=record)
            seconds = time.perf_counter() - start
            image, latents = np.asarray(result.image), result.latents.double().cpu()
            entry = {
                "dtype": name, "mode": mode, "finite": bool(torch.isfinite(latents).all()), "seconds": round(seconds, 2),
                "timings": dataclasses.asdict(result.timings), "unet_calls": result.unet_calls,
                "peak_memory_gib": round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2) if cuda else None,
                "loss_scale_backoffs": warnings.backoffs, "vae_float32_retries": warnings.vae_retries,
                "kept_psnr_to_source_db": round(masked_psnr(image, case.source.image, case.keep_mask), 2),
            }
            if name == "float32":
                fp32[mode] = (image, latents, grads)
            elif mode in fp32:
                image32, latents32, grads32 = fp32[mode]
                entry["image_psnr_to_fp32_db"] = round(masked_psnr(image, image32, np.ones(image.shape[:2], bool)), 2)
                entry["latent_rel_to_fp32"] = round(float((latents - latents32).norm() / latents32.norm()), 4)
                common = sorted(set(grads) & set(grads32))
                if common:
                    a, b = grads[common[0]].flatten(), grads32[common[0]].flatten()
                    entry[f"step{common[0]}_grad_cosine_to_fp32"] = round(float(a @ b / (a.norm() * b.norm())), 5)
                    entry[f"step{common[0]}_grad_rel_to_fp32"] = round(float((a - b).norm() / b.norm()), 4)
            report["runs"].append(entry)
            print(json.dumps(entry), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            result.image.save(Path(args.out) / f"{name}_{mode}.png")
        del editor
        if cuda:
            torch.cuda.empty_cache()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="SD 1.x/2.x folder or single file, 'sd15-random' or 'bundled'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--preset", default="nonstyle")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--out", default="gpu-check")
    args = parser.parse_args()
    if args.dtypes[0] != "float32":
        parser.error("--dtypes must start with float32 (the others are compared with it)")
    report = run(args)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
