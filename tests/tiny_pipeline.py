"""A tiny random Stable Diffusion 1.x pipeline folder built in-process (no download, seconds on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_tiny_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """A character-level CLIP tokenizer (byte alphabet, no merges) with model_max_length 77.

    ``pad_token``: SD 1.x pads with ``<|endoftext|>``, SD 2.x (OpenCLIP) with ``!``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    from gnr_shapes.training.tokenizer import byte_symbols

    alphabet = byte_symbols()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": pad_token,
            }
        )
    )


def build_tiny_pipeline(root: Path, seed: int = 0, prediction_type: str = "epsilon", family: str = "sd1") -> Path:
    """Write a random-weight SD 1.x pipeline (16 self-attention layers, 64² images → 8² latents) to ``root``.

    ``family="sd2"``: the SD 2.x variant — linear attention projections, a per-block head count,
    a wider GELU text encoder (32, vs 16: the tiny stand-in for 1024 vs 768) and ``!`` padding.
    """
    sd2 = family == "sd2"
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32 if sd2 else 16,
        attention_head_dim=(2, 2, 4, 4) if sd2 else 4,
        use_linear_projection=sd2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514, hidden_size=32 if sd2 else 16, intermediate_size=64 if sd2 else 32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            projection_dim=16, hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text_encoder.save_pretrained(root / "text_encoder")
    scheduler.save_pretrained(root / "scheduler")
    write_tiny_tokenizer(root / "tokenizer", pad_token="!" if sd2 else "<|endoftext|>")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "feature_extractor": [None, None],
                "safety_checker": [None, None],
                "requires_safety_checker": False,
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        )
    )
    return root
