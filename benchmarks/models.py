"""Models the benchmarks run on: the golden tiny model and an SD 1.5-architecture UNet with random weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"
sys.path.insert(0, str(ROOT / "tests"))


def golden_editor():
    """The authors' golden tiny model (256² input, 32² latent), or None when shared/ is absent."""
    from gnr_fast import Editor

    path = GOLDEN / "tiny-sd"
    return Editor.from_pretrained(path) if path.is_dir() else None


def tiny_editor():
    """The tests' tiny random pipeline (64² input, tests/tiny_pipeline.py): smoke runs of benchmark code only."""
    import tempfile

    from tiny_pipeline import build_tiny_pipeline

    from gnr_fast import Editor

    path = Path(tempfile.gettempdir()) / "gnr-bench-tiny-sd"
    if not (path / "model_index.json").is_file():
        build_tiny_pipeline(path)
    return Editor.from_pretrained(path)


EDITORS = {"golden": golden_editor, "sd15": lambda: sd15_editor(), "tiny": tiny_editor}
"""Benchmark model name -> editor factory (None when the model's files are absent)."""


def sd15_editor(seed: int = 0):
    """An Editor over SD 1.5's exact UNet/VAE/CLIP-L architectures with random weights (built from config, no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gnr_fast import Editor
    from gnr_fast.loading import Components
    from gnr_fast.schedules import NoiseSchedule
    from tiny_pipeline import write_tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # SD 1.5 unet/config.json
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(  # SD 1.5 vae/config.json
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14 text tower; small vocabulary (random weights anyway)
        vocab_size=514, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="quick_gelu",
    ))
    tok_dir = Path(torch.hub.get_dir()).parent / "gnr-bench-tokenizer"
    write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    components = Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, schedule=NoiseSchedule.from_betas(),
        path=Path("<sd15-random>"), model_id=f"sd15-random-{seed}", device=torch.device("cpu"), dtype=torch.float32,
    )
    return Editor(components)


def random_lora(unet: torch.nn.Module, rank: int, seed: int) -> dict:
    """Random LoRA pairs (scale 0.01) on the Inverse-and-Edit training targets of ``unet`` (the
    modules the bundled model's adapters train: attention, feed-forward, resnet and resampling
    convolutions, the time-embedding projections)."""
    from gnr_fast.lora import LoraPair
    from gnr_shapes.training.lora_adapters import lora_target_names

    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    pairs = {}
    for name in lora_target_names(unet):
        shape = modules[name].weight.shape
        down_shape = (rank, *shape[1:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        pairs[name] = LoraPair(torch.randn(down_shape, generator=generator) * 0.01,
                               torch.randn(up_shape, generator=generator) * 0.01)
    return pairs


def sd15_consistency_editor(components, runtime: str | None = None):
    """A consistency-model Editor over ``components`` of :func:`sd15_editor`: SD 1.5's UNet with a
    512-wide guidance embedding (``time_cond_proj_dim``) as teacher, random rank-64 LoRAs fused into
    a reverse (editing) and a forward (inversion) copy; the VAE and text encoder are shared. Default
    preset ``consistency``; ``runtime``: the editor's runtime (default eager)."""
    import copy
    import dataclasses

    from diffusers import UNet2DConditionModel

    from gnr_fast import Editor
    from gnr_fast.lora import fuse_lora
    from gnr_fast.model_defaults import ModelDefaults
    from gnr_fast.samplers import ConsistencySampler

    torch.manual_seed(1)
    # diffusers' private config keys (``_use_default_values`` lists time_cond_proj_dim) would make
    # from_config drop the explicit value again
    config = {k: v for k, v in components.unet.config.items() if not k.startswith("_")}
    teacher = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 512})
    unets = []
    for seed in (4, 5):
        unet = copy.deepcopy(teacher)
        fuse_lora(unet, random_lora(unet, 64, seed))
        unets.append(unet.eval().requires_grad_(False))
    del teacher
    consistency = dataclasses.replace(components, unet=unets[0], model_id=components.model_id + "-icd")
    return Editor(consistency, runtime=runtime, inversion_unet=unets[1], defaults=ModelDefaults(preset="consistency"),
                  sampler=ConsistencySampler(consistency.schedule.alphas_cumprod))
