"""Train the shapes-world AutoencoderKL (latent factor 8) on this CPU.

    python -m gnr_shapes.training.vae --out runs/vae --steps 3000 --threads 2

Training uses random square crops of pre-rendered 128 px scenes (the model is convolutional and
crops train ~6x faster than full images, /work/shared/notes/toy-model-training.md); evaluation is
PSNR on full held-out images. Finish with a ``--decoder-only --crop 128`` run: GroupNorm
normalises over the whole image, so a decoder trained only on 64 px crops leaves large blotches on
full images (the bundled model's decoder went from 25.2 to 31.5 dB held-out PSNR within 250
full-image steps). Loss: MSE on [-1, 1] pixels + ``kl_weight`` x KL. At the end the
latent std of posterior samples is measured and ``scaling_factor = 1 / std`` is written into the
saved model's config (``<out>/final``).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from gnr_shapes.training.batches import step_generator, step_rng
from gnr_shapes.training.checkpoints import RunLog, load_checkpoint, save_checkpoint
from gnr_shapes.training.run_setup import deadline_reached
from gnr_shapes.training.schedule import TimeBudget, parse_deadline, warmup_cosine_lr
from gnr_shapes.training.seeds import HELD_OUT_SEED_START, TRAIN_SEED_START
from gnr_shapes.world import generate_images


@dataclass(frozen=True)
class VaeShape:
    """Architecture knobs of the AutoencoderKL (4 blocks => latent factor 8)."""

    # Narrow on purpose: every level costs about the same (channels x2, pixels /4) and the CPU
    # is shared; flat-colour scenes need little capacity.
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16


SMOKE_SHAPE = VaeShape(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)



def build_vae(shape: VaeShape, sample_size: int = 128) -> AutoencoderKL:
    """A fresh AutoencoderKL in the SD layout (no mid-block attention: trained on crops)."""
    n = len(shape.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=shape.block_out_channels,
        layers_per_block=shape.layers_per_block,
        latent_channels=shape.latent_channels,
        norm_num_groups=shape.norm_num_groups,
        sample_size=sample_size,
        # Crop training would make global attention see different statistics at full size.
        mid_block_add_attention=False,
    )


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
    mse = ((reference - estimate.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return float((10.0 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def evaluate_psnr(vae: AutoencoderKL, images: torch.Tensor, batch: int = 16) -> float:
    """Held-out reconstruction PSNR (posterior mean, full images)."""
    vae.eval()
    scores = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        recon = vae.decode(vae.encode(chunk).latent_dist.mean).sample
        scores.append(psnr(chunk, recon) * len(chunk))
    vae.train()
    return sum(scores) / len(images)


@torch.no_grad()
def measure_latent_std(vae: AutoencoderKL, images: torch.Tensor, batch: int = 32) -> float:
    """Std of posterior samples over ``images`` (what the UNet will see before scaling)."""
    vae.eval()
    generator = torch.Generator().manual_seed(0)
    latents = [
        vae.encode(images[s : s + batch]).latent_dist.sample(generator)
        for s in range(0, len(images), batch)
    ]
    return float(torch.cat(latents).std())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything to a seconds-long run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=64, help="training crop side in pixels")
    p.add_argument("--size", type=int, default=128, help="scene side in pixels")
    p.add_argument("--pool", type=int, default=12000, help="pre-rendered training scenes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--lr-floor", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--deadline", type=str, default=None, help="HH:MM UTC: stop and fit lr decay")
    p.add_argument("--target-psnr", type=float, default=None, help="stop once reached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init", type=Path, default=None, help="start from this saved VAE folder")
    p.add_argument("--decoder-only", action="store_true",
                   help="freeze the encoder (keeps the latent space and scaling_factor of --init)")
    p.add_argument("--latents", choices=("sample", "mean"), default="sample",
                   help="decode posterior samples (default) or means (--decoder-only: what the "
                        "UNet and inversion produce)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.crop, args.size = 3, 2, 32, 32
        args.pool, args.eval_every, args.eval_images, args.warmup = 8, 2, 4, 1
    return args


def train(args: argparse.Namespace) -> dict[str, float]:
    """Run (or resume) VAE training; returns the final metrics."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = SMOKE_SHAPE if args.smoke else VaeShape()
    log = RunLog(args.out)
    if args.decoder_only and args.init is None:
        raise SystemExit("--decoder-only needs --init (the VAE whose encoder is kept)")
    vae = AutoencoderKL.from_pretrained(args.init) if args.init is not None else build_vae(shape, args.size)
    if args.init is not None:
        shape = VaeShape(tuple(vae.config.block_out_channels), vae.config.layers_per_block,
                         vae.config.latent_channels, vae.config.norm_num_groups)
    frozen = [vae.encoder, vae.quant_conv] if args.decoder_only else []
    for module in frozen:
        module.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    state = load_checkpoint(args.out) if args.resume else None
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
    log.write(f"start step={step} args={vars(args)} shape={asdict(shape)}")

    pool = generate_images(range(TRAIN_SEED_START, TRAIN_SEED_START + args.pool), args.size)
    held_out = to_model_range(
        generate_images(range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + args.eval_images), args.size)
    )
    n_params = sum(p.numel() for p in vae.parameters())
    log.write(f"params={n_params} pool={len(pool)}")

    def checkpoint() -> None:
        save_checkpoint(
            args.out,
            {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "elapsed_s": elapsed, "shape": asdict(shape), "args": vars(args)},
        )

    vae.train()
    score = float("nan")
    bar = tqdm(total=args.steps, initial=step, desc="vae", dynamic_ncols=True)
    t0 = time.time() - elapsed
    budget = TimeBudget(args.steps, parse_deadline(args.deadline), step)
    total = budget.total(step)
    while step < total:
        if deadline_reached(budget, step, log):
            break
        total = budget.total(step)
        # Per-step generators make the data stream identical with or without resuming.
        rng = step_rng(args.seed, step)
        idx = rng.integers(len(pool), size=args.batch)
        ox, oy = rng.integers(args.size - args.crop + 1, size=(2, args.batch))
        crops = np.stack(
            [pool[i, y : y + args.crop, x : x + args.crop] for i, x, y in zip(idx, ox, oy)]
        )
        flips = rng.uniform(size=args.batch) < 0.5
        crops[flips] = crops[flips, :, ::-1]
        x = to_model_range(np.ascontiguousarray(crops))
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, args.lr, args.warmup, total, args.lr_floor)
        with torch.set_grad_enabled(not args.decoder_only):
            posterior = vae.encode(x).latent_dist
        z = (posterior.mean if args.latents == "mean" else
             posterior.sample(step_generator(args.seed, step)))
        recon = vae.decode(z).sample
        mse = torch.mean((recon - x) ** 2)
        kl = posterior.kl().mean()
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, args.clip))
        opt.step()
        step += 1
        elapsed = time.time() - t0
        bar.update(1)
        if step % 25 == 0 or step == total:
            train_psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            bar.set_postfix(mse=f"{mse.item():.5f}", psnr=f"{train_psnr:.1f}", total=total)
            log.write(
                f"step={step} mse={mse.item():.6f} kl={kl.item():.2f} gnorm={grad_norm:.3f} "
                f"lr={opt.param_groups[0]['lr']:.2e} est_total={total} t={elapsed:.0f}s"
            )
        if step % args.eval_every == 0 or step == total:
            score = evaluate_psnr(vae, held_out)
            log.write(f"eval step={step} heldout_psnr={score:.2f}dB t={elapsed:.0f}s")
            checkpoint()
            if args.target_psnr is not None and score >= args.target_psnr:
                log.write(f"target psnr {args.target_psnr} reached at step {step}")
                break
    bar.close()
    checkpoint()

    score = evaluate_psnr(vae, held_out)
    if args.decoder_only:  # same encoder, same latents: keep the UNet's scaling factor
        std = 1.0 / float(vae.config.scaling_factor)
    else:
        std = measure_latent_std(vae, held_out)
        vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(args.out / "final")
    metrics = {"step": step, "heldout_psnr_db": score, "latent_std": std,
               "scaling_factor": 1.0 / std, "wall_s": elapsed}
    log.write(f"final {metrics}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    print(train(parse_args(argv)))


if __name__ == "__main__":
    main()
