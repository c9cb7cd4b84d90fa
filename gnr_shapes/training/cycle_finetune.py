"""Cycle-consistency fine-tune of the forward (inversion) consistency LoRA (Inverse-and-Edit).

    nice -n 19 python -m gnr_shapes.training.cycle_finetune --model gnr_fast/models/shapes-v1 \
        --teacher runs/cfg_teacher/teacher.pt --lora-dir runs/icd --out runs/cycle \
        --pool-from runs/cfg_teacher/latent_pool.pt --deadline 14:00 --threads 1 --seed 35 --resume

The recipe of Inverse-and-Edit's fine-tune (``forward_alignment_step`` in the authors'
``training/src/train.py``): a training latent z0 goes through the full 4-jump forward model
(0 → 259 → 519 → 779 → 999, w = 0, with gradient) and back through the frozen reverse model
(999 → 779 → 519 → 259 → 0, w = 0), and the forward adapter alone is trained so that the
reconstruction equals z0. The authors compare decoded images with LPIPS; no LPIPS weights can be
downloaded here, so the loss is the squared error of the latents (their ``l2`` option). The input is
noised to t = 0 with fresh noise each step, as the editing code does with its fixed noise.

Reads the iCD run's ``reverse_lora.safetensors`` / ``forward_lora.safetensors`` (``--lora-dir``) and
writes a fine-tuned ``forward_lora.safetensors`` (same rank, same layout) to ``--out`` every
``--ckpt-every`` steps; every ``--eval-every`` steps logs the 4 + 4-step reconstruction PSNR of the
held-out scenes of :func:`gnr_shapes.training.consistency.reconstruction_psnr` through the engine's loader.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from gnr_fast.consistency_models import ConsistencyFiles, load_consistency_unets, load_guidance_unet
from gnr_fast.lora import PEFT_PREFIX, read_lora
from gnr_shapes.training.batches import draw_pool_batch, step_streams
from gnr_shapes.training.checkpoints import load_checkpoint, load_torch_file, save_checkpoint
from gnr_shapes.training.consistency import (
    FORWARD_FILE,
    REVERSE_FILE,
    Grid,
    invert,
    reconstruction_batch,
    reconstruction_psnr,
    reverse_sample,
)
from gnr_shapes.training.lora_adapters import (
    attach_lora,
    load_peft_state_dict,
    lora_parameters,
    peft_state_dict,
    save_lora_file,
)
from gnr_shapes.training.run_setup import add_run_options, apply_smoke_sizes, deadline_reached, start_run
from gnr_shapes.training.schedule import TimeBudget, warmup_cosine_lr
from gnr_shapes.training.unet import SD_SCHEDULE, tokenize


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything to a seconds-long run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--teacher", type=Path, required=True, help="the teacher.pt the LoRAs were distilled from")
    p.add_argument("--lora-dir", type=Path, required=True, help="folder with the iCD run's two LoRA files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pool-from", type=Path, required=True, help="a latent_pool.pt (e.g. the teacher run's)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--deadline", type=str, default=None, help="HH:MM UTC: stop and fit lr decay")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr-floor", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-count", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=25)
    add_run_options(p)
    args = p.parse_args(argv)
    if args.smoke:
        apply_smoke_sizes(args, pool=False)
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the fine-tune; returns the final metrics."""
    log, deadline = start_run(args)
    vae = AutoencoderKL.from_pretrained(args.model / "vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(args.model / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(args.model / "text_encoder").eval().requires_grad_(False)
    pool = load_torch_file(args.pool_from)
    scaling = float(vae.config.scaling_factor)
    tokens = tokenize(tokenizer, pool["captions"])
    with torch.no_grad():
        eval_batch = reconstruction_batch(vae, text_encoder, tokenizer, args.eval_count, args.size)

    unet_config = dict(UNet2DConditionModel.load_config(args.model / "unet"))
    start_files = ConsistencyFiles(args.teacher, args.lora_dir / REVERSE_FILE, args.lora_dir / FORWARD_FILE)
    reverse = load_consistency_unets(unet_config, start_files).reverse  # frozen, eval
    start_pairs = read_lora(start_files.forward_lora)
    forward = load_guidance_unet(unet_config, args.teacher)
    adapters = attach_lora(forward, next(iter(start_pairs.values())).rank, args.seed)
    load_peft_state_dict(adapters, {f"{PEFT_PREFIX}{name}.lora_{ab}.weight": getattr(pair, attr)
                                    for name, pair in start_pairs.items()
                                    for ab, attr in (("A", "down"), ("B", "up"))})
    params = lora_parameters(adapters)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    state = load_checkpoint(args.out) if args.resume else None
    if state is not None:
        load_peft_state_dict(adapters, state["lora"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    grid = Grid.build(scheduler)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(start_files.reverse_lora, args.out / REVERSE_FILE)  # the pair the forward one was tuned with
    out_files = ConsistencyFiles(args.teacher, args.out / REVERSE_FILE, args.out / FORWARD_FILE)
    log.write(f"start step={step} args={vars(args)} lora_params={sum(p.numel() for p in params)}")

    def checkpoint() -> None:
        save_checkpoint(args.out, {"lora": peft_state_dict(adapters), "optimizer": opt.state_dict(),
                                   "step": step, "elapsed_s": elapsed, "args": vars(args)})
        save_lora_file(out_files.forward_lora, adapters)

    def evaluate() -> dict[str, float]:
        checkpoint()
        loaded = load_consistency_unets(unet_config, out_files)
        scores = reconstruction_psnr(loaded.forward, loaded.reverse, vae, eval_batch, grid, scheduler)
        log.write(f"step={step} " + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
        return scores

    if step == 0:
        evaluate()
    forward.train()
    budget = TimeBudget(args.steps, deadline, step)
    total = budget.total(step)
    t0 = time.time() - elapsed
    losses: list[float] = []
    scores: dict[str, float] = {}
    while step < total:
        if deadline_reached(budget, step, log):
            break
        total = budget.total(step)
        rng, gen = step_streams(args.seed, step)
        drawn = draw_pool_batch(pool, tokens, text_encoder, scaling, args.batch, rng)
        z0, context = drawn.z0, drawn.context
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, args.lr, args.warmup, total, args.lr_floor)
        inverted = invert(forward, z0, context, grid, scheduler, torch.randn(z0.shape, generator=gen))
        recon = reverse_sample(reverse, inverted, context, 0.0, grid)
        loss = ((recon - z0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        step += 1
        elapsed = time.time() - t0
        losses.append(loss.item())
        if step % 5 == 0 or step == total:
            log.write(f"step={step} cycle_mse={np.mean(losses[-5:]):.5f} lr={opt.param_groups[0]['lr']:.2e} "
                      f"est_total={total} t={elapsed:.0f}s")
        if step % args.ckpt_every == 0:
            checkpoint()
        if step % args.eval_every == 0:
            scores = evaluate()
    scores = evaluate()
    metrics = {"step": step, "wall_s": elapsed, **scores,
               "cycle_mse_last25": float(np.mean(losses[-25:])) if losses else float("nan")}
    log.write(f"final {metrics}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    print(train(parse_args(argv)))


if __name__ == "__main__":
    main()
