"""Distil classifier-free guidance of a model folder's UNet into a guidance-embedded UNet.

    nice -n 19 python -m gnr_shapes.training.guidance_teacher --model gnr_fast/models/shapes-v1 \
        --out runs/cfg_teacher --steps 20000 --deadline 13:05 --threads 1 --seed 35 --resume

The student is the folder's UNet rebuilt with ``time_cond_proj_dim = 512`` (the guidance-scale
embedding, :mod:`gnr_fast.families.guidance_embedding`; sin first, of 1000·w) and initialised from the folder's weights with the
new ``time_embedding.cond_proj`` zero, so at step 0 it is the w-free model at every w. Each step
draws training latents (the folder's VAE posterior means of training scenes, pre-encoded once),
a timestep, noise (with the folder's offset noise) and a guidance scale w (0 with ``--w-zero-prob``,
else uniform in [0, ``--w-max``]), and regresses the student's ε(z_t, t, c, w) onto the frozen
folder UNet's ε_c + w · (ε_c − ε_u) (empty prompt for ε_u; per-row relative squared error), the way the iCD authors' teacher
(``sd15_cfg_distill.pt``) replaces CFG. The text encoder is the folder's, frozen.

Every ``--ckpt-every`` steps the run writes ``checkpoint.pt`` (student, optimizer, EMA, step) and
``teacher.pt`` (the EMA student as a plain ``{name: float32 tensor}`` state dict: the format of the
authors' teacher file, ``../shared/golden/tiny-icd/README.md``), and every ``--eval-every`` steps logs
the relative error of the EMA student against the CFG prediction on fixed held-out scenes at
several w (``heldout_rel_err``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from gnr_fast.families.guidance_embedding import guidance_scale_embedding

from gnr_shapes.training.batches import draw_pool_batch, step_streams
from gnr_shapes.training.checkpoints import load_checkpoint, load_torch_file, save_checkpoint
from gnr_shapes.training.run_setup import apply_smoke_sizes, deadline_reached, start_run
from gnr_shapes.training.schedule import TimeBudget, warmup_cosine_lr
from gnr_shapes.training.seeds import HELD_OUT_SEED_START
from gnr_shapes.training.unet import (
    SD_SCHEDULE,
    encode_pool,
    tokenize,
    training_noise,
    update_ema,
)
from gnr_shapes.training.vae import to_model_range
from gnr_shapes.world import generate_scene

TEACHER_FILE = "teacher.pt"
W_EMBEDDING_DIM = 512
"""Width of the guidance embedding; hard-coded in the authors' editing code, so every teacher we ship uses it."""
EVAL_W = (0.0, 3.0, 7.0, 11.0, 19.0)
"""Guidance scales of the held-out error (0: the conditional model; 3: CFG 4, the ``shapes``
preset's; 7 … 19: the consistency preset's)."""


def embed_w(w: torch.Tensor) -> torch.Tensor:
    """``timestep_cond`` [N, 512] for guidance scales ``w`` [N] (the engine's embedding,
    :func:`gnr_fast.families.guidance_embedding.guidance_scale_embedding`)."""
    return guidance_scale_embedding(w, W_EMBEDDING_DIM)


def cfg_target(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ε_c + w · (ε_c − ε_u) for per-row scales ``w`` [B]: the LCM / iCD convention, in which w = 0 is
    the plain conditional prediction (inversion and source calls) and w is CFG's scale minus one."""
    return eps_cond + w.view(-1, *([1] * (eps_cond.ndim - 1))) * (eps_cond - eps_uncond)


def guided_unet(base: UNet2DConditionModel) -> UNet2DConditionModel:
    """``base``'s architecture with a 512-wide guidance embedding, holding ``base``'s weights and a
    zero ``cond_proj`` (so it predicts exactly what ``base`` predicts, whatever w)."""
    config = dict(base.config)
    config["time_cond_proj_dim"] = W_EMBEDDING_DIM
    unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(base.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise ValueError(f"unexpected weight mismatch building the guided UNet: missing {missing}, "
                         f"unexpected {unexpected}")
    torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    return unet


def sample_w(batch: int, w_max: float, zero_prob: float, rng: np.random.Generator) -> torch.Tensor:
    """Guidance scales [batch] (float32): 0 with probability ``zero_prob``, else uniform in [0, w_max]."""
    w = rng.uniform(0.0, w_max, size=batch)
    w[rng.uniform(size=batch) < zero_prob] = 0.0
    return torch.from_numpy(w).float()


@torch.no_grad()
def cfg_prediction(base: UNet2DConditionModel, zt: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   empty_context: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The frozen ``base``'s ε_c + w · (ε_c − ε_u), conditional and unconditional rows in one call."""
    batch = len(zt)
    eps = base(torch.cat([zt, zt]), torch.cat([t, t]),
               encoder_hidden_states=torch.cat([context, empty_context.expand(batch, -1, -1)])).sample
    return cfg_target(eps[:batch], eps[batch:], w)


@torch.no_grad()
def heldout_batch(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, count: int,
                  size: int, seed: int) -> dict[str, torch.Tensor]:
    """A fixed evaluation batch of held-out scenes: scaled posterior means, caption contexts,
    timesteps spread over [0, 999] and noise (seeded by ``seed``)."""
    scenes = [generate_scene(HELD_OUT_SEED_START + i, size) for i in range(count)]
    z0 = vae.encode(to_model_range(np.stack([s.image for s in scenes]))).latent_dist.mean
    z0 = z0 * float(vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed)
    return {"z0": z0, "context": text_encoder(tokenize(tokenizer, [s.caption for s in scenes])).last_hidden_state,
            "t": torch.linspace(0, 999, count).round().long(), "noise": torch.randn(z0.shape, generator=gen)}


@torch.no_grad()
def heldout_error(student: UNet2DConditionModel, base: UNet2DConditionModel, batch: dict[str, torch.Tensor],
                  empty_context: torch.Tensor, scheduler: DDPMScheduler,
                  ws: tuple[float, ...] = EVAL_W) -> dict[float, float]:
    """Relative L2 error ‖ε_student(w) − ε_cfg(w)‖ / ‖ε_cfg(w)‖ on ``batch`` for each w in ``ws``."""
    zt = scheduler.add_noise(batch["z0"], batch["noise"], batch["t"])
    errors = {}
    for w_value in ws:
        w = torch.full((len(zt),), w_value)
        target = cfg_prediction(base, zt, batch["t"], batch["context"], empty_context, w)
        pred = student(zt, batch["t"], encoder_hidden_states=batch["context"],
                       timestep_cond=embed_w(w)).sample
        errors[w_value] = float((pred - target).norm() / target.norm())
    return errors


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ‖pred − target‖² / ‖target‖²: every row weighs the same relative to its
    target, so the large targets of high w (ε_c − ε_u amplified w-fold) do not drown the w = 0 rows
    (a plain MSE moved the w = 0 prediction by 24 % relative within two steps of a smoke run)."""
    return (((pred - target) ** 2).flatten(1).sum(1) / (target ** 2).flatten(1).sum(1)).mean()


def save_teacher_file(out: Path, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` (float32 tensors) to ``out/teacher.pt`` atomically, as a plain dict."""
    path = out / TEACHER_FILE
    tmp = out / (TEACHER_FILE + ".tmp")
    torch.save({k: v.detach().clone().float() for k, v in state.items()}, tmp)
    os.replace(tmp, path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything to a seconds-long run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="pipeline folder (unet/, vae/, text_encoder/, tokenizer/)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20000, help="maximum number of steps")
    p.add_argument("--deadline", type=str, default=None, help="HH:MM UTC: stop and fit lr decay")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="scene side in pixels")
    p.add_argument("--pool", type=int, default=3000, help="pre-encoded training scenes")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--cond-lr-mult", type=float, default=10.0,
                   help="learning rate of the new time_embedding.cond_proj as a multiple of --lr")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr-floor", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--w-max", type=float, default=19.0,
                   help="largest guidance scale drawn (the consistency preset's range is 0 … 19)")
    p.add_argument("--w-zero-prob", type=float, default=0.2, help="fraction of rows with w = 0")
    p.add_argument("--offset-noise", type=float, default=0.3,
                   help="offset noise of the training inputs (the bundled model was trained with 0.3)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--eval-count", type=int, default=32, help="held-out scenes of the evaluation batch")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-initial-eval", action="store_true", help="skip the held-out error at step 0")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        apply_smoke_sizes(args, pool=True)
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the guidance distillation; returns the final metrics."""
    log, deadline = start_run(args)

    vae = AutoencoderKL.from_pretrained(args.model / "vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(args.model / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(args.model / "text_encoder").eval().requires_grad_(False)
    base = UNet2DConditionModel.from_pretrained(args.model / "unet").eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    pool_path = args.out / "latent_pool.pt"
    if pool_path.exists() and args.resume:
        pool = load_torch_file(pool_path)
    else:
        pool = encode_pool(vae, args.pool, args.size)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(pool, pool_path)
    with torch.no_grad():
        empty_context = text_encoder(tokenize(tokenizer, [""])).last_hidden_state  # [1, 77, D]
        eval_batch = heldout_batch(vae, text_encoder, tokenizer, args.eval_count, args.size, args.seed)
    del vae
    tokens = tokenize(tokenizer, pool["captions"])  # [N, 77]

    student = guided_unet(base)
    params = list(student.parameters())
    cond_proj = student.time_embedding.cond_proj.weight
    # the new, zero-initialised guidance projection gets its own (higher) rate: it has to grow from 0
    opt = torch.optim.AdamW([{"params": [p for p in params if p is not cond_proj], "lr_mult": 1.0},
                             {"params": [cond_proj], "lr_mult": args.cond_lr_mult}], lr=args.lr, weight_decay=0.0)
    ema = {f"unet.{k}": v.detach().clone() for k, v in student.state_dict().items()}
    step, elapsed = 0, 0.0
    state = load_checkpoint(args.out) if args.resume else None
    if state is not None:
        student.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        ema = state["ema"]
        step, elapsed = state["step"], state["elapsed_s"]
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    ema_unet = guided_unet(base).eval().requires_grad_(False)
    log.write(f"start step={step} args={vars(args)} scaling={scaling:.4f} pool={len(tokens)} "
              f"params={sum(p.numel() for p in params)}")

    def ema_weights() -> dict[str, torch.Tensor]:
        return {k[len("unet."):]: v for k, v in ema.items()}

    def checkpoint() -> None:
        save_checkpoint(args.out, {"unet": student.state_dict(), "ema": ema, "optimizer": opt.state_dict(),
                                   "step": step, "elapsed_s": elapsed, "args": vars(args)})
        save_teacher_file(args.out, ema_weights())

    def evaluate() -> dict[float, float]:
        ema_unet.load_state_dict(ema_weights())
        errors = heldout_error(ema_unet, base, eval_batch, empty_context, scheduler)
        log.write(f"step={step} heldout_rel_err " + " ".join(f"w{w:g}={e:.4f}" for w, e in errors.items()))
        return errors

    if step == 0 and not args.no_initial_eval:
        evaluate()
    student.train()
    budget = TimeBudget(args.steps, deadline, step)
    total = budget.total(step)
    t0 = time.time() - elapsed
    losses: list[float] = []
    errors: dict[float, float] = {}
    while step < total:
        if deadline_reached(budget, step, log):
            break
        total = budget.total(step)
        rng, gen = step_streams(args.seed, step)
        drawn = draw_pool_batch(pool, tokens, text_encoder, scaling, args.batch, rng)
        z0, context = drawn.z0, drawn.context
        noise = training_noise(z0.shape, args.offset_noise, gen)
        t = torch.randint(0, SD_SCHEDULE["num_train_timesteps"], (args.batch,), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        w = sample_w(args.batch, args.w_max, args.w_zero_prob, rng)
        target = cfg_prediction(base, zt, t, context, empty_context, w)
        for group in opt.param_groups:
            group["lr"] = group["lr_mult"] * warmup_cosine_lr(step, args.lr, args.warmup, total, args.lr_floor)
        pred = student(zt, t, encoder_hidden_states=context, timestep_cond=embed_w(w)).sample
        loss = relative_mse(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
        opt.step()
        step += 1
        update_ema(ema, {"unet": student}, min(args.ema, (1 + step) / (10 + step)))
        elapsed = time.time() - t0
        losses.append(loss.item())
        if step % 25 == 0 or step == total:
            log.write(f"step={step} cfg_rel_mse={np.mean(losses[-25:]):.5f} gnorm={grad_norm:.3f} "
                      f"lr={opt.param_groups[0]['lr']:.2e} est_total={total} t={elapsed:.0f}s")
        if step % args.ckpt_every == 0:
            checkpoint()
        if step % args.eval_every == 0:
            errors = evaluate()
    checkpoint()
    errors = evaluate()
    metrics = {"step": step, "cfg_rel_mse_last100": float(np.mean(losses[-100:])) if losses else float("nan"),
               "wall_s": elapsed, "heldout_rel_err": errors}
    log.write(f"final {metrics}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    print(train(parse_args(argv)))


if __name__ == "__main__":
    main()
