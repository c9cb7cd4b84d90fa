"""Write a diffusers pipeline folder as a single-file checkpoint in the original LDM key layout (tests only).

The file looks like a released one: UNet under ``model.diffusion_model.``, VAE under
``first_stage_model.`` (mid-block attention as 1×1 convs), text encoder under
``cond_stage_model.transformer.`` (CLIP) or ``cond_stage_model.model.`` (OpenCLIP: fused q/k/v,
plus the unused last resblock and ``text_projection`` that SD 2.x files carry), and the training
buffers (``betas``, ``alphas_cumprod``) that loading must ignore.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gnr_fast.checkpoints.layout import (
    OPEN_CLIP_PREFIX,
    text_encoder_keys,
    to_single_file,
    unet_keys,
    vae_keys,
)


def ldm_state_dict(folder: Path, layout: str = "clip") -> dict[str, torch.Tensor]:
    """The tensors of the pipeline in ``folder`` keyed as in an original single-file checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    out: dict[str, torch.Tensor] = {}
    for module, keys in (
        (unet, unet_keys(dict(unet.named_parameters()), unet.config)),
        (vae, vae_keys(dict(vae.named_parameters()), vae.config)),
        (text_encoder, text_encoder_keys(dict(text_encoder.named_parameters()), layout)),  # type: ignore[arg-type]
    ):
        out.update(to_single_file({n: p.detach().clone() for n, p in module.named_parameters()}, keys))
    if layout == "open_clip":
        width = text_encoder.config.hidden_size
        last = text_encoder.config.num_hidden_layers  # SD 2.x uses the penultimate layer: the last one is unused
        torch.manual_seed(123)
        for name, shape in (
            ("ln_1.weight", [width]), ("ln_1.bias", [width]), ("attn.in_proj_weight", [3 * width, width]),
            ("attn.in_proj_bias", [3 * width]), ("attn.out_proj.weight", [width, width]), ("attn.out_proj.bias", [width]),
        ):
            out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{last}.{name}"] = torch.randn(shape)
        out[OPEN_CLIP_PREFIX + "text_projection"] = torch.randn(width, width)
    else:
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    out["betas"] = betas
    out["alphas_cumprod"] = torch.cumprod(1 - betas, 0)
    return out


def write_single_file(
    folder: Path, path: Path, layout: str = "clip", dtype: torch.dtype | None = None, extra: dict | None = None
) -> Path:
    """Save ``folder``'s pipeline as ``path`` (.safetensors, or .ckpt as ``{"state_dict": …, "global_step": …}``).

    ``dtype`` casts the floating tensors (float16/bfloat16 files as released); ``extra`` adds tensors.
    """
    tensors = ldm_state_dict(folder, layout)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, "global_step": 1}, str(path))
    return path
