"""Multi-boundary consistency distillation (iCD) of a guidance-distilled teacher, as two LoRAs.

    nice -n 19 python -m gnr_shapes.training.consistency --model gnr_fast/models/shapes-v1 \
        --teacher runs/cfg_teacher/teacher.pt --out runs/icd --rank 32 --deadline 14:00 \
        --threads 1 --seed 35 --resume

The recipe of invertible consistency distillation (iCD, arXiv 2406.14539; the authors' training
step, ``training/src/train.py`` of yandex-research/invertible-cd), written for this CPU:

- the DDIM grid of 50 steps (t = 19, 39, …, 999) and boundaries: reverse [0, 259, 519, 779]
  (inference t = 999 → 779 → 519 → 259 → 0), forward [259, 519, 779, 999] (t = 0 → … → 999);
- **reverse**: draw a grid time t, noise a training latent to z_t, draw w from ``--w-values``; the
  teacher (the frozen guidance-distilled UNet at w) takes one DDIM step t → t' = t − 20; the
  student's jump from (z_t, t) to the boundary s ≤ t' is regressed onto its own jump (no gradient)
  from (z_t', t') to s, or onto z_t' itself when t' = s (the boundary condition);
- **forward**: the same upwards with w = 0: a teacher DDIM inversion step t → t + 20, boundaries above;
- a jump from (z, t) with noise ε to s is α_s (z − σ_t ε) / α_t + σ_s ε, with α_s = 1, σ_s = 0 at s = 0;
- pseudo-Huber loss (c = ``--huber-c``), both adapters trained each step (one optimizer each);
- with ``--preserve-coef`` > 0 (the authors' runs: 1.5), each adapter's loss adds the iCD
  *preservation* loss (:func:`preservation_loss`) that ties the two models together at w = 0.

The students are the teacher plus one LoRA each (:mod:`gnr_shapes.training.lora_adapters`; rank
``--rank``, alpha 8 as the loader forces it). Every ``--ckpt-every`` steps the run writes
``checkpoint.pt`` and ``reverse_lora.safetensors`` / ``forward_lora.safetensors`` in the authors'
layout; every ``--eval-every`` steps it fuses those files through the engine's loader
(:func:`gnr_fast.consistency_models.load_consistency_unets`) and logs the 4-step inversion → reconstruction PSNR of held-out
scenes (:func:`reconstruction_psnr`), next to the VAE-only PSNR.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from gnr_fast.consistency_models import ConsistencyFiles, load_consistency_unets, load_guidance_unet
from gnr_shapes.training.batches import draw_pool_batch, step_streams
from gnr_shapes.training.checkpoints import load_checkpoint, load_torch_file, save_checkpoint
from gnr_shapes.training.guidance_teacher import embed_w
from gnr_shapes.training.lora_adapters import (
    attach_lora,
    load_peft_state_dict,
    lora_parameters,
    peft_state_dict,
    save_lora_file,
)
from gnr_shapes.training.run_setup import add_run_options, apply_smoke_sizes, deadline_reached, start_run
from gnr_shapes.training.schedule import TimeBudget, warmup_cosine_lr
from gnr_shapes.training.seeds import HELD_OUT_SEED_START
from gnr_shapes.training.unet import SD_SCHEDULE, encode_pool, tokenize, training_noise
from gnr_shapes.training.vae import psnr, to_model_range
from gnr_shapes.world import generate_scene

REVERSE_BOUNDARIES = (0, 259, 519, 779)
FORWARD_BOUNDARIES = (259, 519, 779, 999)
START_FORWARD_T = 19
"""The boundary 0 as the preservation losses use it (the authors' ``--start_forward_timestep``)."""
INVERSION_NOISE_SEED = 10500
"""Seed of the fixed noise added at t = 0 before the forward jumps (the authors' editing code)."""
REVERSE_FILE, FORWARD_FILE = "reverse_lora.safetensors", "forward_lora.safetensors"
RECONSTRUCTION_SEED_OFFSET = 30_000
"""Held-out scenes of the reconstruction check start here (apart from other held-out uses)."""


@dataclass(frozen=True)
class Grid:
    """The DDIM grid and the schedule's α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t) (float32, [1000])."""

    timesteps: torch.Tensor  # [K] int64: 19, 39, ..., 999
    alphas: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    def build(cls, scheduler: DDPMScheduler, steps: int = 50) -> "Grid":
        ratio = scheduler.config.num_train_timesteps // steps
        timesteps = torch.from_numpy((np.arange(1, steps + 1) * ratio).round().astype(np.int64) - 1)
        bar = scheduler.alphas_cumprod.float()
        return cls(timesteps=timesteps, alphas=bar.sqrt(), sigmas=(1 - bar).sqrt())

    @property
    def gap(self) -> int:
        return int(self.timesteps[1] - self.timesteps[0])


def jump(eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, grid: Grid) -> torch.Tensor:
    """α_s (z − σ_t ε) / α_t + σ_s ε per row, with (α_s, σ_s) = (1, 0) where s = 0 (a consistency
    jump from t to the boundary s; also a DDIM step when s is the next grid time)."""
    shape = (-1,) + (1,) * (z.ndim - 1)
    alpha_s = torch.where(s == 0, 1.0, grid.alphas[s]).view(shape)
    sigma_s = torch.where(s == 0, 0.0, grid.sigmas[s]).view(shape)
    x0 = (z - grid.sigmas[t].view(shape) * eps) / grid.alphas[t].view(shape)
    return alpha_s * x0 + sigma_s * eps


def reverse_boundary(t: torch.Tensor, boundaries: tuple[int, ...] = REVERSE_BOUNDARIES) -> torch.Tensor:
    """The largest reverse boundary ≤ t, per row."""
    ends = torch.tensor(boundaries)
    return ends[(t[:, None] >= ends[None, :]).sum(1) - 1]


def forward_boundary(t: torch.Tensor, boundaries: tuple[int, ...] = FORWARD_BOUNDARIES) -> torch.Tensor:
    """The smallest forward boundary ≥ t, per row."""
    ends = torch.tensor(boundaries)
    return ends[(t[:, None] > ends[None, :]).sum(1)]


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((pred − target)² + c²) − c) (the LCM / iCD consistency loss)."""
    return (torch.sqrt((pred - target) ** 2 + c * c) - c).mean()


def consistency_loss(student: UNet2DConditionModel, teacher: UNet2DConditionModel, z0: torch.Tensor,
                     noise: torch.Tensor, context: torch.Tensor, w: torch.Tensor, grid: Grid,
                     scheduler: DDPMScheduler, forward: bool, huber_c: float,
                     generator: torch.Generator, index: torch.Tensor | None = None) -> torch.Tensor:
    """One iCD loss of ``student`` (reverse, or the forward/inversion model with ``forward``) at the
    grid times ``grid.timesteps[index]`` (``index`` drawn uniformly from ``generator`` when None)."""
    k = len(grid.timesteps)
    if forward:
        if index is None:
            index = torch.randint(0, k - 1, (len(z0),), generator=generator)
        t = grid.timesteps[index]
        t_next = grid.timesteps[index + 1]
        boundary = forward_boundary(t_next)
    else:
        if index is None:
            index = torch.randint(0, k, (len(z0),), generator=generator)
        t = grid.timesteps[index]
        t_next = (t - grid.gap).clamp(min=0)
        boundary = reverse_boundary(t_next)
    w_emb = embed_w(w)
    zt = scheduler.add_noise(z0, noise, t)
    pred = jump(student(zt, t, encoder_hidden_states=context, timestep_cond=w_emb).sample, zt, t, boundary, grid)
    with torch.no_grad():
        eps_teacher = teacher(zt, t, encoder_hidden_states=context, timestep_cond=w_emb).sample
        # one DDIM step of the teacher's ODE (t_next = 0 keeps ᾱ_0: not a boundary jump)
        shape = (-1,) + (1,) * (zt.ndim - 1)
        x0 = (zt - grid.sigmas[t].view(shape) * eps_teacher) / grid.alphas[t].view(shape)
        z_next = grid.alphas[t_next].view(shape) * x0 + grid.sigmas[t_next].view(shape) * eps_teacher
        eps_next = student(z_next, t_next, encoder_hidden_states=context, timestep_cond=w_emb).sample
        target = jump(eps_next, z_next, t_next, boundary, grid)
        at_boundary = (t_next == boundary).view(shape)
        target = torch.where(at_boundary, z_next, target)
    return pseudo_huber(pred, target, huber_c)


def preservation_loss(trained: UNet2DConditionModel, frozen: UNet2DConditionModel, z0: torch.Tensor,
                      noise: torch.Tensor, context: torch.Tensor, grid: Grid, scheduler: DDPMScheduler,
                      forward: bool, huber_c: float, generator: torch.Generator,
                      index: torch.Tensor | None = None) -> torch.Tensor:
    """iCD's preservation loss of ``trained`` at w = 0 between the boundary pair ``index`` (drawn
    uniformly when None): lower = (0→19, 259, 519, 779)[index], upper = (259, 519, 779, 999)[index].

    ``forward``: the latent noised to ``upper``, the frozen reverse model's jump down to ``lower``,
    and ``trained`` (the forward model) must jump it back onto the noised latent; else the same
    the other way round (noised to ``lower``, the frozen forward model up, ``trained`` back down).
    Zero when each model's ε is the noise that made the latent (both jumps exact)."""
    if index is None:
        index = torch.randint(0, len(FORWARD_BOUNDARIES), (len(z0),), generator=generator)
    upper = torch.tensor(FORWARD_BOUNDARIES)[index]
    lower = torch.tensor(REVERSE_BOUNDARIES)[index].clamp(min=START_FORWARD_T)
    start, end = (upper, lower) if forward else (lower, upper)
    w_emb = embed_w(torch.zeros(len(z0)))
    z_start = scheduler.add_noise(z0, noise, start)
    with torch.no_grad():
        z_end = jump(frozen(z_start, start, encoder_hidden_states=context, timestep_cond=w_emb).sample,
                     z_start, start, end, grid)
    back = jump(trained(z_end, end, encoder_hidden_states=context, timestep_cond=w_emb).sample, z_end, end, start, grid)
    return pseudo_huber(back, z_start, huber_c)


def invert(forward_unet: UNet2DConditionModel, z0: torch.Tensor, context: torch.Tensor, grid: Grid,
           scheduler: DDPMScheduler, noise: torch.Tensor | None = None) -> torch.Tensor:
    """4-jump consistency inversion at w = 0: z0 noised to t = 0 with ``noise`` (default: the
    editing code's fixed seed-10500 noise), then jumps 0 → 259 → 519 → 779 → 999. Keeps the autograd
    graph unless called under ``torch.no_grad``."""
    if noise is None:
        noise = torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(INVERSION_NOISE_SEED))
        noise = noise.expand_as(z0)
    z = scheduler.add_noise(z0, noise, torch.zeros(len(z0), dtype=torch.long))
    w_emb = embed_w(torch.zeros(len(z0)))
    for t_value, s_value in zip((0,) + FORWARD_BOUNDARIES[:-1], FORWARD_BOUNDARIES):
        t = torch.full((len(z0),), t_value)
        eps = forward_unet(z, t, encoder_hidden_states=context, timestep_cond=w_emb).sample
        z = jump(eps, z, t, torch.full_like(t, s_value), grid)
    return z


def reverse_sample(reverse_unet: UNet2DConditionModel, z: torch.Tensor, context: torch.Tensor, w: float,
                   grid: Grid) -> torch.Tensor:
    """4-jump reverse consistency sampling 999 → 779 → 519 → 259 → 0 at guidance scale ``w`` (keeps
    the autograd graph unless called under ``torch.no_grad``)."""
    w_emb = embed_w(torch.full((len(z),), float(w)))
    starts = tuple(reversed(FORWARD_BOUNDARIES))  # 999, 779, 519, 259
    for t_value, s_value in zip(starts, tuple(reversed(REVERSE_BOUNDARIES))):
        t = torch.full((len(z),), t_value)
        eps = reverse_unet(z, t, encoder_hidden_states=context, timestep_cond=w_emb).sample
        z = jump(eps, z, t, torch.full_like(t, s_value), grid)
    return z


@torch.no_grad()
def reconstruction_psnr(forward_unet: UNet2DConditionModel, reverse_unet: UNet2DConditionModel,
                        vae: AutoencoderKL, batch: dict[str, torch.Tensor], grid: Grid,
                        scheduler: DDPMScheduler) -> dict[str, float]:
    """Mean PSNR (dB) of 4-step inversion + 4-step reconstruction at w = 0 with each scene's caption,
    and of the VAE alone, over ``batch`` (:func:`reconstruction_batch`)."""
    scaling = float(vae.config.scaling_factor)
    z = reverse_sample(reverse_unet, invert(forward_unet, batch["z0"], batch["context"], grid, scheduler),
                       batch["context"], 0.0, grid)
    return {"recon_psnr_db": psnr(batch["images"], vae.decode(z / scaling).sample),
            "vae_psnr_db": psnr(batch["images"], vae.decode(batch["z0"] / scaling).sample)}


@torch.no_grad()
def reconstruction_batch(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                         count: int, size: int) -> dict[str, torch.Tensor]:
    """Held-out scenes for :func:`reconstruction_psnr`: images, scaled posterior means, contexts."""
    scenes = [generate_scene(HELD_OUT_SEED_START + RECONSTRUCTION_SEED_OFFSET + i, size) for i in range(count)]
    images = to_model_range(np.stack([s.image for s in scenes]))
    z0 = vae.encode(images).latent_dist.mean * float(vae.config.scaling_factor)
    context = text_encoder(tokenize(tokenizer, [s.caption for s in scenes])).last_hidden_state
    return {"images": images, "z0": z0, "context": context}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything to a seconds-long run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="pipeline folder (unet/ config, vae/, text_encoder/, tokenizer/)")
    p.add_argument("--teacher", type=Path, required=True, help="guidance-distilled teacher state dict (teacher.pt)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pool-from", type=Path, default=None,
                   help="reuse this latent_pool.pt (e.g. the teacher run's) instead of encoding a new one")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (both adapters)")
    p.add_argument("--steps", type=int, default=20000, help="maximum number of steps")
    p.add_argument("--deadline", type=str, default=None, help="HH:MM UTC: stop and fit lr decay")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="scene side in pixels")
    p.add_argument("--pool", type=int, default=3000, help="pre-encoded training scenes (without --pool-from)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr-floor", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--w-values", type=str, default="0,3,7,11,15,19",
                   help="guidance scales drawn for the reverse model (the authors: 0,7,11,15,19)")
    p.add_argument("--huber-c", type=float, default=0.001)
    p.add_argument("--preserve-coef", type=float, default=0.0,
                   help="weight of the preservation loss added to each adapter's (the authors: 1.5; 0: off)")
    p.add_argument("--offset-noise", type=float, default=0.3)
    p.add_argument("--eval-count", type=int, default=16, help="held-out scenes of the reconstruction check")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=50)
    add_run_options(p)
    args = p.parse_args(argv)
    if args.smoke:
        apply_smoke_sizes(args, pool=True)
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the distillation of both adapters; returns the final metrics."""
    log, deadline = start_run(args)
    w_values = torch.tensor([float(v) for v in args.w_values.split(",")])

    vae = AutoencoderKL.from_pretrained(args.model / "vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(args.model / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(args.model / "text_encoder").eval().requires_grad_(False)
    pool_path = args.pool_from if args.pool_from is not None else args.out / "latent_pool.pt"
    if pool_path.exists() and (args.resume or args.pool_from is not None):
        pool = load_torch_file(pool_path)
    else:
        pool = encode_pool(vae, args.pool, args.size)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(pool, pool_path)
    scaling = float(vae.config.scaling_factor)
    tokens = tokenize(tokenizer, pool["captions"])
    with torch.no_grad():
        eval_batch = reconstruction_batch(vae, text_encoder, tokenizer, args.eval_count, args.size)

    unet_config = dict(UNet2DConditionModel.load_config(args.model / "unet"))
    teacher = load_guidance_unet(unet_config, args.teacher).eval().requires_grad_(False)
    students = {"reverse": copy.deepcopy(teacher), "forward": copy.deepcopy(teacher)}
    adapters = {name: attach_lora(unet, args.rank, args.seed + i) for i, (name, unet) in enumerate(students.items())}
    opts = {name: torch.optim.AdamW(lora_parameters(a), lr=args.lr, weight_decay=0.0) for name, a in adapters.items()}
    step, elapsed = 0, 0.0
    state = load_checkpoint(args.out) if args.resume else None
    if state is not None:
        for name in adapters:
            load_peft_state_dict(adapters[name], state["lora"][name])
            opts[name].load_state_dict(state["optimizer"][name])
        step, elapsed = state["step"], state["elapsed_s"]
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    grid = Grid.build(scheduler)
    files = {"reverse": args.out / REVERSE_FILE, "forward": args.out / FORWARD_FILE}
    log.write(f"start step={step} args={vars(args)} scaling={scaling:.4f} pool={len(tokens)} "
              f"lora_params={ {n: sum(p.numel() for p in lora_parameters(a)) for n, a in adapters.items()} }")

    def checkpoint() -> None:
        save_checkpoint(args.out, {"lora": {n: peft_state_dict(a) for n, a in adapters.items()},
                                   "optimizer": {n: o.state_dict() for n, o in opts.items()},
                                   "step": step, "elapsed_s": elapsed, "args": vars(args)})
        for name, adapter in adapters.items():
            save_lora_file(files[name], adapter)

    def evaluate() -> dict[str, float]:
        checkpoint()
        loaded = load_consistency_unets(unet_config, ConsistencyFiles(args.teacher, files["reverse"], files["forward"]))
        scores = reconstruction_psnr(loaded.forward, loaded.reverse, vae, eval_batch, grid, scheduler)
        log.write(f"step={step} " + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
        return scores

    if step == 0:
        evaluate()
    for unet in students.values():
        unet.train()
    budget = TimeBudget(args.steps, deadline, step)
    total = budget.total(step)
    t0 = time.time() - elapsed
    losses: dict[str, list[float]] = {name: [] for name in students}
    scores: dict[str, float] = {}
    while step < total:
        if deadline_reached(budget, step, log):
            break
        total = budget.total(step)
        rng, gen = step_streams(args.seed, step)
        drawn = draw_pool_batch(pool, tokens, text_encoder, scaling, args.batch, rng)
        z0, context = drawn.z0, drawn.context
        noise = training_noise(z0.shape, args.offset_noise, gen)
        lr = warmup_cosine_lr(step, args.lr, args.warmup, total, args.lr_floor)
        for name, unet in students.items():
            forward = name == "forward"
            w = torch.zeros(args.batch) if forward else w_values[torch.from_numpy(
                rng.integers(len(w_values), size=args.batch))]
            loss = consistency_loss(unet, teacher, z0, noise, context, w, grid, scheduler, forward,
                                    args.huber_c, gen)
            if args.preserve_coef > 0:
                other = students["reverse" if forward else "forward"]
                loss = loss + args.preserve_coef * preservation_loss(unet, other, z0, noise, context, grid,
                                                                     scheduler, forward, args.huber_c, gen)
            for group in opts[name].param_groups:
                group["lr"] = lr
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_parameters(adapters[name]), args.clip)
            opts[name].step()
            losses[name].append(loss.item())
        step += 1
        elapsed = time.time() - t0
        if step % 25 == 0 or step == total:
            terms = " ".join(f"{n}_huber={np.mean(v[-25:]):.5f}" for n, v in losses.items())
            log.write(f"step={step} {terms} lr={lr:.2e} est_total={total} t={elapsed:.0f}s")
        if step % args.ckpt_every == 0:
            checkpoint()
        if step % args.eval_every == 0:
            scores = evaluate()
    scores = evaluate()
    metrics = {"step": step, "wall_s": elapsed, **scores,
               **{f"{n}_huber_last100": float(np.mean(v[-100:])) for n, v in losses.items() if v}}
    log.write(f"final {metrics}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    print(train(parse_args(argv)))


if __name__ == "__main__":
    main()
