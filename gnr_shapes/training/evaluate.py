"""Measure an exported shapes model: text-to-image fidelity and DDIM-inversion reconstruction.

    python -m gnr_shapes.training.evaluate --model gnr_fast/models/shapes-v1 --captions 200 \
        --inversions 20 --out runs/eval.json

- **Fidelity**: captions of held-out scenes are generated with the plain diffusers pipeline
  (DDIM, ``--steps`` steps, classifier-free guidance ``--cfg``); the judge reads each image and an
  image counts when it agrees with every attribute the caption states
  (:func:`gnr_shapes.world.judge.agrees_with_caption`: a striped or checkered background's two
  colours in either order, since the caption does not say which comes first;
  ``fidelity_all_stated_strict_order`` also demands the renderer's order). Per-attribute accuracies
  (against the rendered truth, colour order included) are reported too.
- **Inversion PSNR**: held-out scenes are encoded, DDIM-inverted with their own caption and no
  guidance (DESIGN.md section 2), then denoised back with the same caption (section 3 with no
  guiders) and decoded; PSNR against the original image, next to the VAE-only PSNR (the ceiling).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from tqdm import tqdm

from gnr_fast.schedules import NoiseSchedule, ddim_step_down, ddim_step_up, ddim_timesteps
from gnr_shapes.training.seeds import HELD_OUT_SEED_START
from gnr_shapes.training.vae import psnr, to_model_range
from gnr_shapes.world import generate_scene, parse_caption
from gnr_shapes.world.judge import (
    DEFAULT_JUDGE_DIR,
    agrees_with_caption,
    attribute_matches,
    background_colours_agree,
    attributes_of,
    load_judge,
)

# Offsets into the held-out seed range so the fidelity and inversion scenes differ from the
# scenes used for VAE/judge evaluation (which start at HELD_OUT_SEED_START).
FIDELITY_SEED_OFFSET = 200_000
INVERSION_SEED_OFFSET = 300_000
# Captions for choosing sampler settings (e.g. the CFG scale) without looking at the test captions.
TUNING_SEED_OFFSET = 400_000
CAPTION_SETS = {"test": FIDELITY_SEED_OFFSET, "tune": TUNING_SEED_OFFSET}


@torch.no_grad()
def text_to_image_fidelity(pipe: StableDiffusionPipeline, judge_dir: Path, count: int, steps: int,
                           cfg: float, batch: int, seed: int, caption_set: str = "test") -> dict[str, float]:
    """Fraction of generated images whose judged attributes match their caption, plus
    per-attribute accuracies against the caption's attributes. ``caption_set`` picks the held-out
    captions: ``test`` (the reported numbers) or ``tune`` (disjoint, for choosing settings)."""
    judge = load_judge(judge_dir)
    first = HELD_OUT_SEED_START + CAPTION_SETS[caption_set]
    scenes = [generate_scene(first + i) for i in range(count)]
    images = []
    for start in tqdm(range(0, count, batch), desc="fidelity", dynamic_ncols=True):
        prompts = [s.caption for s in scenes[start : start + batch]]
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, output_type="np",
                   generator=torch.Generator().manual_seed(seed + start))
        images.append(np.rint(out.images * 255).astype(np.uint8))
    predicted = judge.predict(np.concatenate(images))
    captions = [parse_caption(s.caption) for s in scenes]
    truth = [attributes_of(s.spec) for s in scenes]
    per_attribute = attribute_matches(predicted, truth)
    metrics = {
        "fidelity_all_stated": float(np.mean([agrees_with_caption(p, c) for p, c in zip(predicted, captions)])),
        "fidelity_all_stated_strict_order": float(np.mean(
            [agrees_with_caption(p, c, strict_order=True) for p, c in zip(predicted, captions)])),
    } | {f"fidelity_{k}": v for k, v in per_attribute.items()}
    for kind in sorted({t.background_kind for t in truth}):
        rows = [i for i, t in enumerate(truth) if t.background_kind == kind]
        of_kind = attribute_matches([predicted[i] for i in rows], [truth[i] for i in rows])
        metrics[f"fidelity_background_colours_{kind}"] = of_kind["background_colours"]  # in the renderer's order
        metrics[f"fidelity_background_colours_as_stated_{kind}"] = float(np.mean([
            background_colours_agree(predicted[i].background_colours, kind, captions[i].background_colours)
            for i in rows]))
        metrics[f"captions_background_{kind}"] = len(rows)
    return metrics


@torch.no_grad()
def inversion_psnr(pipe: StableDiffusionPipeline, count: int, steps: int) -> dict[str, float]:
    """Mean PSNR of DDIM inversion + reconstruction (source caption, no guidance) and of the VAE
    alone, over ``count`` held-out scenes."""
    schedule = NoiseSchedule.from_betas(**{k: pipe.scheduler.config[k] for k in (
        "beta_start", "beta_end", "num_train_timesteps", "beta_schedule")})
    timesteps = ddim_timesteps(steps, schedule.num_train_timesteps)  # [980, ..., 0]
    scaling = pipe.vae.config.scaling_factor
    scores, vae_scores = [], []
    for i in tqdm(range(count), desc="inversion", dynamic_ncols=True):
        scene = generate_scene(HELD_OUT_SEED_START + INVERSION_SEED_OFFSET + i)
        image = to_model_range(scene.image[None])  # [1, 3, H, W]
        ids = pipe.tokenizer([scene.caption], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        context = pipe.text_encoder(ids)[0]  # [1, 77, D]
        z = pipe.vae.encode(image).latent_dist.mean * scaling  # [1, 4, h, w]
        vae_scores.append(psnr(image, pipe.vae.decode(z / scaling).sample))
        for t in reversed(timesteps):  # 0, 20, ..., 980: upward (DESIGN.md section 2)
            eps = pipe.unet(z, t, encoder_hidden_states=context).sample
            z = ddim_step_up(schedule, eps, t, z, steps)
        for t in timesteps:  # 980, ..., 0: downward (DESIGN.md section 3, no guidance)
            eps = pipe.unet(z, t, encoder_hidden_states=context).sample
            z = ddim_step_down(schedule, eps, t, z, steps)
        scores.append(psnr(image, pipe.vae.decode(z / scaling).sample))
    return {"inversion_psnr_db": float(np.mean(scores)), "vae_only_psnr_db": float(np.mean(vae_scores))}


@torch.no_grad()
def judge_through_vae(pipe: StableDiffusionPipeline, judge_dir: Path, count: int, batch: int = 50) -> dict[str, float]:
    """Per-attribute judge accuracy on held-out scenes after a VAE encode/decode round trip, and
    the round trip's mean PSNR over the same scenes."""
    judge = load_judge(judge_dir)
    scenes = [generate_scene(HELD_OUT_SEED_START + i) for i in range(count)]
    images, scores = [], []
    for start in range(0, count, batch):
        x = to_model_range(np.stack([s.image for s in scenes[start : start + batch]]))
        recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        scores.append(psnr(x, recon) * len(x))
        images.append(((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    predicted = judge.predict(np.concatenate(images))
    accuracy = attribute_matches(predicted, [attributes_of(s.spec) for s in scenes])
    return {f"judge_through_vae_{k}": v for k, v in accuracy.items()} | {
        "vae_round_trip_psnr_db": sum(scores) / count}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: writes the metrics JSON to ``--out`` and prints it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--judge", type=Path, default=DEFAULT_JUDGE_DIR)
    p.add_argument("--captions", type=int, default=200)
    p.add_argument("--inversions", type=int, default=20)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--caption-set", choices=tuple(CAPTION_SETS), default="test",
                   help="held-out captions for fidelity: test (reported) or tune (for choosing --cfg)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--judge-vae-check", type=int, default=0,
                   help="also report judge accuracy on this many VAE round-tripped scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(str(args.model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    metrics: dict[str, object] = {"model": str(args.model), "steps": args.steps, "cfg": args.cfg,
                                  "captions": args.captions, "caption_set": args.caption_set,
                                  "inversions": args.inversions}
    if args.judge_vae_check > 0:
        metrics |= judge_through_vae(pipe, args.judge, args.judge_vae_check)
    if args.captions > 0:
        metrics |= text_to_image_fidelity(pipe, args.judge, args.captions, args.steps, args.cfg,
                                          args.batch, args.seed, args.caption_set)
    if args.inversions > 0:
        metrics |= inversion_psnr(pipe, args.inversions, args.steps)
    metrics["wall_s"] = round(time.time() - start, 1)
    text = json.dumps(metrics, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
