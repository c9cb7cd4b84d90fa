"""Train the shapes-world UNet2DConditionModel and CLIP text encoder jointly on this CPU.

    python -m gnr_shapes.training.unet --out runs/unet --vae runs/vae/final \
        --tokenizer runs/tokenizer --steps 20000 --deadline 10:15 --threads 2

Objective: DDPM epsilon-prediction with the SD 1.x noise schedule (scaled_linear betas
0.00085 -> 0.012, 1000 steps; DESIGN.md section 1), Min-SNR-gamma loss weighting, 10 % empty
captions (so classifier-free guidance works). Latents come from a pre-encoded pool (posterior
mean and std of the trained VAE; toy-model-training.md: encoding on the fly costs more than the
UNet step). By default the UNet learns the posterior *means*, which is also what inversion encodes
(``images.encode``); ``--latents sample`` draws a posterior sample each step instead (with a small
KL weight the posterior noise is a large, unpredictable part of every target). ``--offset-noise``
adds a per-(sample, channel) constant to the training noise (see :func:`training_noise`). An
exponential moving average (EMA) of both models is kept and is what ``export`` uses.

``--deadline HH:MM`` (UTC) makes the run stop cleanly at that time and fits the cosine learning
rate decay to the time left: every 50 steps the total step count is re-estimated from the measured
throughput (capped at ``--steps``).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gnr_shapes.training.batches import draw_indices, step_streams
from gnr_shapes.training.checkpoints import load_checkpoint, load_torch_file, save_checkpoint
from gnr_shapes.training.run_setup import add_run_options, deadline_reached, start_run
from gnr_shapes.training.schedule import TimeBudget, warmup_cosine_lr
from gnr_shapes.training.seeds import TRAIN_SEED_START
from gnr_shapes.training.vae import to_model_range
from gnr_shapes.world import generate_scene
from gnr_shapes.world.captions import relaxed_caption

# SD 1.x training noise schedule (DESIGN.md section 1).
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear"}


@dataclass(frozen=True)
class DenoiserShape:
    """Architecture knobs of the UNet and text encoder.

    The block layout is SD 1.x's (3 x CrossAttnDownBlock2D + DownBlock2D, mid block with
    cross-attention, UpBlock2D + 3 x CrossAttnUpBlock2D); with ``layers_per_block = 2`` it has
    SD 1.x's 16 self-attention layers (6 down, 1 mid, 9 up; DESIGN.md section 4).
    """

    block_out_channels: tuple[int, ...] = (32, 64, 64, 64)
    layers_per_block: int = 2
    attention_heads: int = 4
    norm_num_groups: int = 32
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 49408  # the CLIP vocabulary (training/tokenizer.py)


SMOKE_SHAPE = DenoiserShape(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, text_hidden=16,
                            text_heads=2, attention_heads=2)


def build_unet(shape: DenoiserShape, latent_size: int = 16) -> UNet2DConditionModel:
    """A fresh UNet2DConditionModel in the SD 1.x block layout."""
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=shape.block_out_channels,
        layers_per_block=shape.layers_per_block,
        cross_attention_dim=shape.text_hidden,
        # diffusers' SD 1.x configs use attention_head_dim for the number of heads.
        attention_head_dim=shape.attention_heads,
        norm_num_groups=shape.norm_num_groups,
    )


def build_text_encoder(shape: DenoiserShape) -> CLIPTextModel:
    """A fresh small CLIPTextModel over the CLIP vocabulary (77-token context)."""
    config = CLIPTextConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.text_hidden,
        intermediate_size=4 * shape.text_hidden,
        projection_dim=shape.text_hidden,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,  # <|startoftext|>
        eos_token_id=49407,  # <|endoftext|>
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids [N, 77], padded the way SD 1.x pipelines pad prompts."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, count: int, size: int, batch: int = 64) -> dict[str, object]:
    """Render ``count`` training scenes and store their VAE posterior mean/std and captions."""
    means, stds, captions, specs = [], [], [], []
    for start in tqdm(range(0, count, batch), desc="encode pool", dynamic_ncols=True):
        scenes = [generate_scene(TRAIN_SEED_START + s, size)
                  for s in range(start, min(count, start + batch))]
        dist = vae.encode(to_model_range(np.stack([s.image for s in scenes]))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        captions.extend(s.caption for s in scenes)
        specs.extend(s.spec for s in scenes)
    return {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions, "specs": specs}


def batch_captions(pool: dict[str, object], idx: torch.Tensor, relaxed_prob: float,
                   rng: np.random.Generator) -> list[str]:
    """The captions of pool entries ``idx``: each the grammar's caption, or with probability
    ``relaxed_prob`` a random relaxed form of it (:func:`gnr_shapes.world.captions.relaxed_caption`:
    no size word, synonyms, "on blue", "red circle, blue background", "plain")."""
    captions = pool["captions"]
    if relaxed_prob <= 0:
        return [captions[i] for i in idx.tolist()]
    if "specs" not in pool:
        raise ValueError("--relaxed-prob needs a latent pool with scene specs; delete "
                         "latent_pool.pt in --out (it predates relaxed captions) to re-encode it")
    specs = pool["specs"]
    return [relaxed_caption(specs[i], rng) if rng.uniform() < relaxed_prob else captions[i]
            for i in idx.tolist()]


def pool_latents(pool: dict[str, object], idx: torch.Tensor, scaling: float, mode: str,
                 generator: torch.Generator) -> torch.Tensor:
    """Scaled training latents [B, 4, h, w] of pool entries ``idx``: the posterior mean
    (``mode="mean"``) or one posterior sample (``mode="sample"``)."""
    mean = pool["mean"][idx]
    if mode == "mean":
        return mean * scaling
    if mode == "sample":
        return (mean + pool["std"][idx] * torch.randn(mean.shape, generator=generator)) * scaling
    raise ValueError(f"latents mode must be 'mean' or 'sample', got {mode!r}")


def training_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise of ``shape`` [B, C, h, w], plus ``offset`` times one normal draw per
    (sample, channel) shared by all positions when ``offset > 0`` ("offset noise").

    Why: with the SD 1.x schedule the final step keeps sqrt(alpha_bar_T) ~ 0.07 of the clean latent,
    and on a 16 x 16 latent the spatial mean of that signal (the image's overall colour) is as
    large as the spatial mean of the noise, so a model trained on plain noise reads the colour
    off the noise instead of the prompt and, sampling from pure noise, draws the background colour
    at random. The offset makes the noise's mean uninformative about the image's.
    """
    noise = torch.randn(shape, generator=generator)
    if offset > 0:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon-prediction, min(SNR, gamma) / SNR
    (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 9)."""
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1.0 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], models: dict[str, torch.nn.Module], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for every floating-point parameter/buffer."""
    for prefix, model in models.items():
        for name, value in model.state_dict().items():
            key = f"{prefix}.{name}"
            if value.dtype.is_floating_point:
                ema[key].mul_(decay).add_(value, alpha=1.0 - decay)
            else:
                ema[key].copy_(value)


def ema_state(ema: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict of one model (``unet`` or ``text_encoder``) out of the EMA dict."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in ema.items() if k.startswith(prefix + ".")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything to a seconds-long run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vae", type=Path, required=True, help="folder saved by training.vae (final/)")
    p.add_argument("--tokenizer", type=Path, required=True, help="folder from training.tokenizer")
    p.add_argument("--steps", type=int, default=20000, help="maximum number of steps")
    p.add_argument("--deadline", type=str, default=None, help="HH:MM UTC: stop and fit lr decay")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128, help="scene side in pixels")
    p.add_argument("--pool", type=int, default=10000, help="pre-encoded training scenes")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--lr-floor", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--latents", choices=("mean", "sample"), default="mean",
                   help="train on VAE posterior means (default) or posterior samples")
    p.add_argument("--offset-noise", type=float, default=0.0,
                   help="std of a per-(sample, channel) constant added to the noise (0: off, plain DDPM; "
                        "the bundled model was fine-tuned with 0.3, see training_noise)")
    p.add_argument("--empty-prob", type=float, default=0.1, help="fraction of empty captions")
    p.add_argument("--relaxed-prob", type=float, default=0.0,
                   help="fraction of captions replaced by a random relaxed form (no size word, "
                        "synonyms, 'on blue', comma form; world.captions.relaxed_caption)")
    p.add_argument("--init-model", type=Path, default=None,
                   help="pipeline folder (unet/, text_encoder/) to start from instead of random "
                        "weights, e.g. gnr_fast/models/shapes-v1 (fine-tuning); ignored on --resume "
                        "with a checkpoint")
    p.add_argument("--text-lr-mult", type=float, default=1.0,
                   help="text-encoder learning rate as a multiple of --lr")
    p.add_argument("--freeze-unet", action="store_true",
                   help="train the text encoder only (the UNet keeps --init-model's weights)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of a distillation term: the student's ε on each row's caption (full or relaxed) "
                        "pulled toward the --init-model teacher's ε on the scene's full grammar caption")
    p.add_argument("--data-weight", type=float, default=1.0, help="weight of the ε-prediction (data) term")
    p.add_argument("--anchor", type=float, default=0.0,
                   help="weight of an anchor term: the student text encoder's output on each row's full grammar "
                        "caption pulled toward the --init-model teacher's (full captions keep their embedding "
                        "while relaxed ones are learned)")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR gamma (paper default)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=250)
    add_run_options(p, threads=2)
    args = p.parse_args(argv)
    if (args.distill > 0 or args.anchor > 0 or args.freeze_unet) and args.init_model is None:
        p.error("--distill, --anchor and --freeze-unet need --init-model (the teacher and the frozen UNet)")
    if args.data_weight <= 0 and args.distill <= 0:
        p.error("--data-weight 0 needs --distill > 0 (else nothing is trained)")
    if args.smoke:
        args.steps, args.batch, args.size, args.pool = 3, 2, 32, 4
        args.warmup, args.ckpt_every = 1, 2
    return args


def save_final(out: Path, ema: dict[str, torch.Tensor], shape: DenoiserShape, latent_size: int) -> None:
    """Write the EMA UNet and text encoder as diffusers/transformers folders under ``out/final``."""
    unet, text_encoder = build_unet(shape, latent_size), build_text_encoder(shape)
    unet.load_state_dict(ema_state(ema, "unet"))
    text_encoder.load_state_dict(ema_state(ema, "text_encoder"))
    unet.save_pretrained(out / "final" / "unet")
    text_encoder.save_pretrained(out / "final" / "text_encoder")


def frozen_teacher(unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                   unet_frozen: bool = False) -> dict[str, torch.nn.Module]:
    """The teacher of ``--distill``: frozen copies of the starting UNet and text encoder. With
    ``unet_frozen`` (``--freeze-unet``: the student's UNet never changes) the teacher's UNet is the
    student's own module, not a copy."""
    teacher_unet = unet if unet_frozen else copy.deepcopy(unet).eval().requires_grad_(False)
    return {"unet": teacher_unet, "text_encoder": copy.deepcopy(text_encoder).eval().requires_grad_(False)}


def distillation_mse(eps: torch.Tensor, teacher: dict[str, torch.nn.Module], zt: torch.Tensor,
                     t: torch.Tensor, full_ids: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the student's ``eps`` and the teacher's ε on the same noisy
    latents with the full grammar captions ``full_ids``: a relaxed caption is taught to mean what
    its full caption means to the teacher, and a full caption to keep meaning it."""
    with torch.no_grad():
        context = teacher["text_encoder"](full_ids).last_hidden_state
        target = teacher["unet"](zt, t, encoder_hidden_states=context).sample
    return ((eps - target) ** 2).mean()


def embedding_anchor_mse(text_encoder: CLIPTextModel, teacher: dict[str, torch.nn.Module],
                         full_ids: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the student's and the teacher's text-encoder outputs on the full
    grammar captions ``full_ids``: zero while a full caption still means exactly what it meant."""
    with torch.no_grad():
        target = teacher["text_encoder"](full_ids).last_hidden_state
    return ((text_encoder(full_ids).last_hidden_state - target) ** 2).mean()


def train(args: argparse.Namespace) -> dict[str, float]:
    """Run (or resume) UNet + text-encoder training; returns the final metrics."""
    log, deadline = start_run(args)
    shape = SMOKE_SHAPE if args.smoke else DenoiserShape()
    latent_size = args.size // 8

    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(args.tokenizer))
    scaling = float(vae.config.scaling_factor)
    pool_path = args.out / "latent_pool.pt"
    if pool_path.exists() and args.resume:
        pool = load_torch_file(pool_path)
    else:
        pool = encode_pool(vae, args.pool, args.size)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(pool, pool_path)
    del vae
    tokens = tokenize(tokenizer, pool["captions"])  # [N, 77]
    empty = tokenize(tokenizer, [""])[0]  # [77]

    unet, text_encoder = build_unet(shape, latent_size), build_text_encoder(shape)
    if args.init_model is not None:
        # load_state_dict (strict) into the built shapes, so an --init-model of another
        # architecture fails here rather than at export.
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.init_model / "unet").state_dict())
        text_encoder.load_state_dict(
            CLIPTextModel.from_pretrained(args.init_model / "text_encoder").state_dict())
    teacher = (frozen_teacher(unet, text_encoder, unet_frozen=args.freeze_unet)
               if args.distill > 0 or args.anchor > 0 else None)
    models = {"unet": unet, "text_encoder": text_encoder}
    # A frozen UNet's EMA stays its weights bit for bit (decay·w + (1 − decay)·w rounds).
    trained = {name: m for name, m in models.items() if not (name == "unet" and args.freeze_unet)}
    if args.freeze_unet:
        unet.requires_grad_(False)
        params = list(text_encoder.parameters())
        groups = [{"params": params, "lr_mult": args.text_lr_mult}]
    else:
        params = list(unet.parameters()) + list(text_encoder.parameters())
        # One parameter group unless the text encoder gets its own rate (checkpoints of earlier runs
        # hold a one-group optimizer state).
        groups = ([{"params": list(unet.parameters()), "lr_mult": 1.0},
                   {"params": list(text_encoder.parameters()), "lr_mult": args.text_lr_mult}]
                  if args.text_lr_mult != 1.0 else [{"params": params, "lr_mult": 1.0}])
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    ema = {f"{p}.{k}": v.detach().clone() for p, m in models.items() for k, v in m.state_dict().items()}
    step, elapsed = 0, 0.0
    state = load_checkpoint(args.out) if args.resume else None
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        ema = state["ema"]
        step, elapsed = state["step"], state["elapsed_s"]
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE)
    log.write(f"start step={step} args={vars(args)} shape={asdict(shape)} scaling={scaling:.4f}")
    log.write(f"params unet={sum(p.numel() for p in unet.parameters())} "
              f"text_encoder={sum(p.numel() for p in text_encoder.parameters())} pool={len(tokens)}")

    def checkpoint() -> None:
        save_checkpoint(args.out, {
            "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "ema": ema,
            "optimizer": opt.state_dict(), "step": step, "elapsed_s": elapsed,
            "shape": asdict(shape), "latent_size": latent_size, "args": vars(args)})

    unet.train(not args.freeze_unet)  # a frozen UNet (also the teacher's) stays in eval mode
    text_encoder.train()
    budget = TimeBudget(args.steps, deadline, step)
    total = budget.total(step)
    t0 = time.time() - elapsed
    losses: list[float] = []
    distill_losses: list[float] = []
    anchor_losses: list[float] = []
    bar = tqdm(total=args.steps, initial=step, desc="unet", dynamic_ncols=True)
    while step < total:
        if deadline_reached(budget, step, log):
            break
        total = budget.total(step)
        rng, gen = step_streams(args.seed, step)
        idx = draw_indices(rng, len(tokens), args.batch)
        z0 = pool_latents(pool, idx, scaling, args.latents, gen)  # [B, 4, h, w]
        noise = training_noise(z0.shape, args.offset_noise, gen)
        t = torch.randint(0, SD_SCHEDULE["num_train_timesteps"], (args.batch,), generator=gen)
        zt = noise_scheduler.add_noise(z0, noise, t)
        ids = (tokenize(tokenizer, batch_captions(pool, idx, args.relaxed_prob, rng))
               if args.relaxed_prob > 0 else tokens[idx].clone())
        empty_rows = torch.from_numpy(rng.uniform(size=args.batch) < args.empty_prob)
        ids[empty_rows] = empty
        for group in opt.param_groups:
            group["lr"] = group.get("lr_mult", 1.0) * warmup_cosine_lr(
                step, args.lr, args.warmup, total, args.lr_floor)

        context = text_encoder(ids).last_hidden_state  # [B, 77, D]
        eps = unet(zt, t, encoder_hidden_states=context).sample
        per_sample = ((eps - noise) ** 2).flatten(1).mean(1)
        loss = args.data_weight * (per_sample * min_snr_weights(noise_scheduler, t, args.snr_gamma)).mean()
        if teacher is not None:
            full_ids = tokens[idx].clone()
            full_ids[empty_rows] = empty
        if args.distill > 0:
            distill = distillation_mse(eps, teacher, zt, t, full_ids)
            loss = loss + args.distill * distill
            distill_losses.append(distill.item())
        if args.anchor > 0:
            anchor = embedding_anchor_mse(text_encoder, teacher, full_ids)
            loss = loss + args.anchor * anchor
            anchor_losses.append(anchor.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
        opt.step()
        step += 1
        update_ema(ema, trained, min(args.ema, (1 + step) / (10 + step)))
        elapsed = time.time() - t0
        losses.append(per_sample.mean().item())
        bar.update(1)
        if step % 50 == 0 or step == total:
            mean_loss = float(np.mean(losses[-50:]))
            bar.set_postfix(loss=f"{mean_loss:.4f}", total=total)
            terms_text = f"distill_mse={np.mean(distill_losses[-50:]):.5f} " if distill_losses else ""
            if anchor_losses:
                terms_text += f"anchor_mse={np.mean(anchor_losses[-50:]):.6f} "
            log.write(f"step={step} eps_mse={mean_loss:.5f} {terms_text}gnorm={grad_norm:.3f} "
                      f"lr={opt.param_groups[0]['lr']:.2e} est_total={total} t={elapsed:.0f}s")
        if step % args.ckpt_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    save_final(args.out, ema, shape, latent_size)
    metrics = {"step": step, "eps_mse_last100": float(np.mean(losses[-100:])) if losses else
               float("nan"), "wall_s": elapsed}
    if distill_losses:
        metrics["distill_mse_last100"] = float(np.mean(distill_losses[-100:]))
    if anchor_losses:
        metrics["anchor_mse_last100"] = float(np.mean(anchor_losses[-100:]))
    log.write(f"final {metrics}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    print(train(parse_args(argv)))


if __name__ == "__main__":
    main()
