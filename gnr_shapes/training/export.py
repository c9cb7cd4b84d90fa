"""Assemble the trained components into a standard diffusers StableDiffusionPipeline folder.

    python -m gnr_shapes.training.export --vae runs/vae/final --unet-run runs/unet \
        --tokenizer runs/tokenizer --out gnr_fast/models/shapes-v1

The UNet and text encoder are the EMA (default) or raw weights of the latest checkpoint in
``--unet-run`` (so a run can be exported while it keeps training). The scheduler is saved as a DDIMScheduler with SD 1.x
settings; there is no safety checker or feature extractor. The folder loads with plain
``StableDiffusionPipeline.from_pretrained(path, local_files_only=True)``. ``--defaults-from MODEL``
copies MODEL's ``gnr_fast.json`` (preset, caption grammar) into the export, less the grammar's
``relaxed_text_encoder``: the exported folder has one text encoder, which then encodes every prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from gnr_shapes.training.checkpoints import load_checkpoint
from gnr_shapes.training.unet import (
    SD_SCHEDULE,
    DenoiserShape,
    build_text_encoder,
    build_unet,
    ema_state,
)

logger = logging.getLogger(__name__)


def sd_ddim_scheduler() -> DDIMScheduler:
    """DDIM with the SD 1.x settings (DESIGN.md section 1; steps_offset 1 as in SD 1.x configs)."""
    return DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(vae_dir: Path, unet_run: Path, tokenizer_dir: Path,
                      weights: str = "ema") -> tuple[StableDiffusionPipeline, dict]:
    """Build the pipeline from the VAE folder, the UNet run's checkpoint and the tokenizer.

    ``weights`` picks the EMA ("ema") or the raw last-step ("raw") UNet and text encoder.
    Returns the pipeline and the checkpoint's bookkeeping (step, elapsed seconds, args).
    """
    state = load_checkpoint(unet_run)
    if state is None:
        raise FileNotFoundError(f"no checkpoint.pt in --unet-run {unet_run}; train the UNet first")
    shape = DenoiserShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["shape"].items()})
    unet = build_unet(shape, state["latent_size"])
    text_encoder = build_text_encoder(shape)
    if weights == "ema":
        unet.load_state_dict(ema_state(state["ema"], "unet"))
        text_encoder.load_state_dict(ema_state(state["ema"], "text_encoder"))
    elif weights == "raw":
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
    else:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir),
        text_encoder=text_encoder.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        unet=unet.eval(),
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    info = {"step": state["step"], "elapsed_s": state["elapsed_s"], "args": state["args"],
            "weights": weights}
    return pipe, info


def export(vae_dir: Path, unet_run: Path, tokenizer_dir: Path, out: Path, weights: str = "ema") -> dict:
    """Write the pipeline folder to ``out`` (replacing weights there); return the UNet run info."""
    pipe, info = assemble_pipeline(vae_dir, unet_run, tokenizer_dir, weights)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # save_pretrained writes only tokenizer.json; keep the classic SD 1.x files beside it.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir / name, out / "tokenizer" / name)
    (out / "training_state.json").write_text(
        json.dumps({"unet_step": info["step"], "unet_wall_s": round(info["elapsed_s"]),
                    "weights": weights,
                    "unet_args": {k: str(v) for k, v in info["args"].items()}}, indent=2) + "\n")
    logger.info("exported pipeline at UNet step %d to %s", info["step"], out)
    return info


def copy_model_defaults(model: Path, out: Path) -> None:
    """Write ``model``'s ``gnr_fast.json`` to ``out`` without ``caption_grammar.relaxed_text_encoder``
    (the second text encoder is not part of an export); validated on the way by
    :func:`gnr_fast.model_defaults.load_model_defaults` (a model without the file is an error here)."""
    from gnr_fast.model_defaults import METADATA_NAME, load_model_defaults

    source = model / METADATA_NAME
    if not source.is_file():
        raise FileNotFoundError(f"--defaults-from {model}: no {METADATA_NAME} there")
    load_model_defaults(model)
    data = json.loads(source.read_text())
    if isinstance(data.get("caption_grammar"), dict):
        data["caption_grammar"].pop("relaxed_text_encoder", None)
    (out / METADATA_NAME).write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--vae", type=Path, required=True, help="VAE folder (runs/vae/final)")
    parser.add_argument("--unet-run", type=Path, required=True, help="UNet run folder (checkpoint.pt)")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                        help="EMA weights (default) or the raw weights of the last checkpoint")
    parser.add_argument("--defaults-from", type=Path, default=None, metavar="MODEL",
                        help="copy MODEL's gnr_fast.json (less its relaxed_text_encoder) into the export")
    args = parser.parse_args(argv)
    info = export(args.vae, args.unet_run, args.tokenizer, args.out, args.weights)
    if args.defaults_from is not None:
        copy_model_defaults(args.defaults_from, args.out)
    print(f"exported UNet step {info['step']} to {args.out}")


if __name__ == "__main__":
    main()
