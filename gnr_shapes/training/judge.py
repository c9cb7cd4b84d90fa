"""Train the shapes-world judge (gnr_shapes.world.judge) on freshly rendered scenes.

    python -m gnr_shapes.training.judge --out runs/judge --steps 3000 --threads 1 \
        --export gnr_shapes/models/shapes-judge

Every step renders new scenes (seeds from JUDGE_TRAIN_SEED_START upwards, so the judge never sees
a scene twice nor any held-out scene) and applies the augmentations VAE-decoded and generated
images need: Gaussian blur, pixel noise and a small colour jitter. Training oversamples
two-object scenes and non-plain backgrounds relative to the generative model's data so the rare
cases are judged well too. Accuracy is reported per attribute on held-out seeds, on clean
images and on blurred ones.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gnr_shapes.training.batches import step_generator, step_rng
from gnr_shapes.training.checkpoints import RunLog, load_checkpoint, load_torch_file, save_checkpoint
from gnr_shapes.training.run_setup import add_run_options
from gnr_shapes.training.schedule import warmup_cosine_lr
from gnr_shapes.training.seeds import HELD_OUT_SEED_START, JUDGE_TRAIN_SEED_START
from gnr_shapes.world import generate_scene
from gnr_shapes.world.judge import (
    HEADS,
    JudgeConfig,
    JudgeNet,
    attribute_matches,
    load_judge,
    attributes_of,
    decode_attributes,
    encode_attributes,
    prepare_images,
    save_judge,
)

# Training distribution: more two-object scenes and patterned backgrounds than the defaults.
TRAIN_TWO_OBJECT_PROB = 0.4
TRAIN_BACKGROUND_WEIGHTS = {"plain": 0.4, "gradient": 0.2, "stripes": 0.2, "checks": 0.2}


def render_batch(seeds: range, size: int, **kwargs: object) -> tuple[np.ndarray, dict[str, torch.Tensor], list]:
    """Images uint8 [B, H, W, 3], label tensors per head, and the ground-truth attributes."""
    scenes = [generate_scene(s, size, **kwargs) for s in seeds]  # type: ignore[arg-type]
    truth = [attributes_of(s.spec) for s in scenes]
    codes = [encode_attributes(t) for t in truth]
    labels = {h: torch.tensor([c[h] for c in codes]) for h in HEADS}
    return np.stack([s.image for s in scenes]), labels, truth


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of x [B, 3, H, W] with its own sigma [B] (pixels; 0 = unchanged)."""
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)  # [K]
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)  # [B, K]
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    b, c, h, w = x.shape
    flat = x.reshape(1, b * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)  # [B*3, K]
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator, max_sigma: float, max_noise: float) -> torch.Tensor:
    """Random blur (sigma up to ``max_sigma`` px at full size), colour jitter (+-6 % gain, +-0.06
    offset per channel, in [-1, 1] units) and Gaussian noise (std up to ``max_noise``)."""
    b = x.shape[0]
    x = gaussian_blur(x, torch.rand(b, generator=gen) * max_sigma)
    gain = 1.0 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.12
    offset = (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.12
    noise = torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * max_noise
    return (x * gain + offset + noise).clamp(-1.0, 1.0)


def to_input(images: np.ndarray, config: JudgeConfig, gen: torch.Generator | None,
             max_sigma: float, max_noise: float) -> torch.Tensor:
    """uint8 images -> judge input; augmented at full resolution when ``gen`` is given."""
    x = prepare_images(images, images.shape[1])
    if gen is not None:
        x = augment(x, gen, max_sigma, max_noise)
    return F.interpolate(x, size=(config.input_size,) * 2, mode="area")


@torch.no_grad()
def evaluate(net: JudgeNet, count: int, size: int, blur_sigma: float = 0.0,
             vae_dir: Path | None = None) -> dict[str, float]:
    """Per-attribute accuracy on ``count`` held-out scenes of the default distribution, optionally
    blurred (``blur_sigma`` px) or passed through the VAE at ``vae_dir``."""
    net.eval()
    images, _, truth = render_batch(range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + count), size)
    if vae_dir is not None:
        images = round_trip(vae_dir, images)
    x = prepare_images(images, size)
    if blur_sigma > 0:
        x = gaussian_blur(x, torch.full((len(x),), blur_sigma))
    x = F.interpolate(x, size=(net.config.input_size,) * 2, mode="area")
    predicted = []
    for start in range(0, len(x), 256):
        logits = net(x[start : start + 256])
        classes = {h: v.argmax(1) for h, v in logits.items()}
        predicted += [decode_attributes({h: int(v[i]) for h, v in classes.items()})
                      for i in range(len(next(iter(classes.values()))))]
    net.train()
    return attribute_matches(predicted, truth)


@torch.no_grad()
def round_trip(vae_dir: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """uint8 images -> VAE encode (posterior mean) -> decode -> uint8 images."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    out = []
    for start in tqdm(range(0, len(images), batch), desc="vae round trip", dynamic_ncols=True):
        x = prepare_images(images[start : start + batch], images.shape[1])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out.append(((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


# Offset of the VAE round-trip pool's seeds inside the judge's training range (disjoint from the
# on-the-fly scenes, which use at most steps * batch seeds from the range start).
VAE_POOL_SEED_OFFSET = 2_000_000


def vae_round_trip_pool(vae_dir: Path, count: int, size: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Round-tripped images and labels of ``count`` judge-training scenes: the artefacts the
    judge must tolerate on decoded and generated images."""
    first = JUDGE_TRAIN_SEED_START + VAE_POOL_SEED_OFFSET
    images, labels = render_batch(range(first, first + count), size, two_object_prob=TRAIN_TWO_OBJECT_PROB,
                                  background_weights=TRAIN_BACKGROUND_WEIGHTS)[:2]
    return round_trip(vae_dir, images), labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything to a seconds-long run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--export", type=Path, default=None, help="write model.safetensors/config.json here")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-blur", type=float, default=1.5, help="max blur sigma in pixels")
    p.add_argument("--max-noise", type=float, default=0.06, help="max noise std in [-1, 1] units")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-scenes", type=int, default=1000)
    p.add_argument("--init", type=Path, default=None, help="start from this judge folder")
    p.add_argument("--vae", type=Path, default=None, help="VAE folder for round-trip training images")
    p.add_argument("--vae-pool", type=int, default=2000, help="round-tripped scenes to pre-compute")
    p.add_argument("--vae-fraction", type=float, default=0.5, help="share of each batch from the pool")
    p.add_argument("--vae-eval-scenes", type=int, default=300, help="held-out scenes judged through the VAE")
    add_run_options(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.size, args.eval_every, args.eval_scenes = 3, 4, 64, 2, 8
        args.warmup, args.vae_pool, args.vae_eval_scenes = 1, 4, 4
    return args


def train(args: argparse.Namespace) -> dict[str, float]:
    """Run (or resume) judge training; returns held-out accuracies (clean and blurred)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = JudgeConfig(widths=(8, 8, 8, 8), input_size=32) if args.smoke else JudgeConfig()
    if args.init is not None:
        net = load_judge(args.init).net.train()
        config = net.config
    else:
        net = JudgeNet(config)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    log = RunLog(args.out)
    step, elapsed = 0, 0.0
    state = load_checkpoint(args.out) if args.resume else None
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
    log.write(f"start step={step} args={vars(args)} config={asdict(config)}")

    def checkpoint() -> None:
        save_checkpoint(args.out, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                                   "step": step, "elapsed_s": elapsed, "args": vars(args)})

    pool_images, pool_labels = None, None
    if args.vae is not None:
        pool_file = args.out / "vae_pool.pt"
        if pool_file.exists():
            pool_images, pool_labels = load_torch_file(pool_file)
        else:
            pool_images, pool_labels = vae_round_trip_pool(args.vae, args.vae_pool, args.size)
            torch.save((pool_images, pool_labels), pool_file)
    n_pool = int(round(args.batch * args.vae_fraction)) if pool_images is not None else 0

    t0 = time.time() - elapsed
    net.train()
    bar = tqdm(total=args.steps, initial=step, desc="judge", dynamic_ncols=True)
    while step < args.steps:
        first = JUDGE_TRAIN_SEED_START + step * args.batch
        images, labels, _ = render_batch(range(first, first + args.batch - n_pool), args.size,
                                         two_object_prob=TRAIN_TWO_OBJECT_PROB,
                                         background_weights=TRAIN_BACKGROUND_WEIGHTS)
        if n_pool:
            pick = step_rng(args.seed, step).integers(len(pool_images), size=n_pool)
            images = np.concatenate([images, pool_images[pick]])
            labels = {h: torch.cat([labels[h], pool_labels[h][torch.from_numpy(pick)]]) for h in HEADS}
        gen = step_generator(args.seed, step)
        x = to_input(images, config, gen, args.max_blur, args.max_noise)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, args.lr, args.warmup, args.steps, 0.02)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[h], labels[h]) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = time.time() - t0
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.write(f"step={step} loss={loss.item():.5f} t={elapsed:.0f}s")
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(net, min(args.eval_scenes, 500), args.size)
            log.write(f"eval step={step} " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()))
            checkpoint()
    bar.close()
    checkpoint()
    clean = evaluate(net, args.eval_scenes, args.size)
    blurred = evaluate(net, args.eval_scenes, args.size, blur_sigma=1.0)
    log.write(f"final clean {clean}")
    log.write(f"final blurred(sigma=1) {blurred}")
    through_vae = evaluate(net, args.vae_eval_scenes, args.size, vae_dir=args.vae) if args.vae else {}
    if through_vae:
        log.write(f"final through VAE {args.vae} {through_vae}")
    if args.export is not None:
        save_judge(net, args.export)
        log.write(f"exported to {args.export}")
    return {"step": step, "wall_s": elapsed} | {f"clean_{k}": v for k, v in clean.items()} | {
        f"blur1_{k}": v for k, v in blurred.items()} | {f"vae_{k}": v for k, v in through_vae.items()}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    print(train(parse_args(argv)))


if __name__ == "__main__":
    main()
