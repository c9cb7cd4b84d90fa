"""Where each diffusers parameter of SD 1.x/2.x lives in an original (LDM / CompVis / Stability) single file.

The single-file layout is the one of the original training code: the UNet under
``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` / ``output_blocks``), the VAE under
``first_stage_model.``, and the text encoder under ``cond_stage_model.transformer.`` (OpenAI CLIP,
SD 1.x) or ``cond_stage_model.model.`` (OpenCLIP, SD 2.x: q, k and v fused into ``in_proj``).

Loading converts with diffusers' own single-file code; this module is the inverse, derived from
the structure of a diffusers model, so that a file can be checked for missing keys and wrong
shapes *before* diffusers loads it (diffusers loads with ``strict=False`` and would leave missing
weights random), and so that tests can write files in the original layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

TextLayout = Literal["clip", "open_clip"]

# diffusers ResnetBlock2D name → LDM ResBlock name (UNet)
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers VAE mid-block Attention name → LDM AttnBlock name; the LDM weights are 1×1 convs
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# diffusers CLIP encoder-layer name → OpenCLIP resblock name
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPEN_CLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


@dataclass(frozen=True)
class LdmKey:
    """The single-file tensor that holds one diffusers parameter.

    ``part``/``parts``: the parameter is rows ``part`` of ``parts`` equal row blocks of the tensor
    (OpenCLIP's fused q, k, v). ``conv1x1``: the tensor is a 1×1 convolution weight
    ([C_out, C_in, 1, 1]) where diffusers has a linear weight ([C_out, C_in]).
    """

    name: str
    part: int = 0
    parts: int = 1
    conv1x1: bool = False

    def ldm_shape(self, diffusers_shape: torch.Size) -> tuple[int, ...]:
        """Shape of the single-file tensor holding a parameter of ``diffusers_shape``."""
        shape = (diffusers_shape[0] * self.parts, *diffusers_shape[1:])
        return (*shape, 1, 1) if self.conv1x1 else shape


def _rename(name: str, table: dict[str, str]) -> str:
    """Replace the first component-path prefix of ``name`` found in ``table`` (dot-aligned)."""
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def _unet_prefixes(config: Any) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is a ResNet) for every block of an SD-style UNet config."""
    per_block = int(config["layers_per_block"])
    n_blocks = len(config["down_block_types"])
    prefixes: list[tuple[str, str, bool]] = [
        ("time_embedding.linear_1", "time_embed.0", False),
        ("time_embedding.linear_2", "time_embed.2", False),
        ("conv_in", "input_blocks.0.0", False),
        ("conv_norm_out", "out.0", False),
        ("conv_out", "out.2", False),
        ("mid_block.resnets.0", "middle_block.0", True),
        ("mid_block.attentions.0", "middle_block.1", False),
        ("mid_block.resnets.1", "middle_block.2", True),
    ]
    for b in range(n_blocks):
        for layer in range(per_block):
            i = 1 + b * (per_block + 1) + layer  # input_blocks.0 is conv_in
            prefixes.append((f"down_blocks.{b}.resnets.{layer}", f"input_blocks.{i}.0", True))
            prefixes.append((f"down_blocks.{b}.attentions.{layer}", f"input_blocks.{i}.1", False))
        prefixes.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{1 + b * (per_block + 1) + per_block}.0.op", False))
        has_attention = "CrossAttn" in config["up_block_types"][b]
        for layer in range(per_block + 1):
            i = b * (per_block + 1) + layer
            prefixes.append((f"up_blocks.{b}.resnets.{layer}", f"output_blocks.{i}.0", True))
            prefixes.append((f"up_blocks.{b}.attentions.{layer}", f"output_blocks.{i}.1", False))
        last = b * (per_block + 1) + per_block
        prefixes.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{last}.{2 if has_attention else 1}.conv", False))
    return prefixes


def unet_keys(names: Iterable[str], config: Any) -> dict[str, LdmKey]:
    """LDM key of every UNet parameter name (``model.diffusion_model.`` included)."""
    prefixes = _unet_prefixes(config)
    keys = {}
    for name in names:
        for old, new, is_resnet in prefixes:
            if name.startswith(old + "."):
                rest = name[len(old) + 1 :]
                keys[name] = LdmKey(UNET_PREFIX + new + "." + (_rename(rest, _UNET_RESNET) if is_resnet else rest))
                break
        else:
            raise ValueError(f"UNet parameter {name!r} has no place in the SD 1.x/2.x single-file layout")
    return keys


def vae_keys(names: Iterable[str], config: Any) -> dict[str, LdmKey]:
    """LDM key of every AutoencoderKL parameter name (``first_stage_model.`` included)."""
    n_blocks = len(config["up_block_types"])
    table = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        table[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
    for b in range(n_blocks):
        table[f"encoder.down_blocks.{b}.resnets"] = f"encoder.down.{b}.block"
        table[f"encoder.down_blocks.{b}.downsamplers.0"] = f"encoder.down.{b}.downsample"
        # the LDM decoder counts its up blocks from the lowest resolution upward, diffusers the other way
        table[f"decoder.up_blocks.{b}.resnets"] = f"decoder.up.{n_blocks - 1 - b}.block"
        table[f"decoder.up_blocks.{b}.upsamplers.0"] = f"decoder.up.{n_blocks - 1 - b}.upsample"
    keys = {}
    for name in names:
        attention = next((p for p in ("encoder", "decoder") if name.startswith(f"{p}.mid_block.attentions.0.")), None)
        if attention is not None:
            rest = name[len(f"{attention}.mid_block.attentions.0.") :]
            inner = _rename(rest, _VAE_ATTENTION)
            is_conv = rest.endswith(".weight") and not rest.startswith("group_norm.")
            keys[name] = LdmKey(f"{VAE_PREFIX}{attention}.mid.attn_1.{inner}", conv1x1=is_conv)
            continue
        # only ResNets have a conv_shortcut; the LDM calls it nin_shortcut
        keys[name] = LdmKey(VAE_PREFIX + _rename(name, table).replace(".conv_shortcut.", ".nin_shortcut."))
    return keys


def text_encoder_keys(names: Iterable[str], layout: TextLayout) -> dict[str, LdmKey]:
    """LDM key of every CLIPTextModel parameter name (with or without a ``text_model.`` prefix)."""
    keys = {}
    for name in names:
        bare = name.removeprefix("text_model.")
        if layout == "clip":
            keys[name] = LdmKey(CLIP_PREFIX + "text_model." + bare)
            continue
        if bare in _OPEN_CLIP_TOP:
            keys[name] = LdmKey(OPEN_CLIP_PREFIX + _OPEN_CLIP_TOP[bare])
            continue
        if not bare.startswith("encoder.layers."):
            raise ValueError(f"text encoder parameter {name!r} has no place in the OpenCLIP single-file layout")
        index, rest = bare[len("encoder.layers.") :].split(".", 1)
        block = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{index}."
        qkv = next((i for i, p in enumerate(_OPEN_CLIP_QKV) if rest.startswith(p + ".")), None)
        if qkv is not None:
            keys[name] = LdmKey(block + "attn.in_proj_" + rest.rsplit(".", 1)[1], part=qkv, parts=3)
        else:
            keys[name] = LdmKey(block + _rename(rest, _OPEN_CLIP_LAYER))
    return keys


def with_clip_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``cond_stage_model.transformer.X`` to ``cond_stage_model.transformer.text_model.X``.

    Files written with older transformers (a CLIPTextModel without the ``text_model`` level) keep
    the text encoder one level up; everything else expects the released files' layout.
    """
    legacy = CLIP_PREFIX + "embeddings."
    if not any(k.startswith(legacy) for k in state_dict):
        return state_dict
    return {
        CLIP_PREFIX + "text_model." + k[len(CLIP_PREFIX) :]
        if k.startswith(CLIP_PREFIX) and not k.startswith(CLIP_PREFIX + "text_model.")
        else k: v
        for k, v in state_dict.items()
    }


def expected_shapes(parameters: dict[str, torch.Size], keys: dict[str, LdmKey]) -> dict[str, tuple[int, ...]]:
    """Single-file key → shape it must have, for diffusers ``parameters`` placed by ``keys``."""
    return {keys[name].name: keys[name].ldm_shape(shape) for name, shape in parameters.items()}


def to_single_file(state_dict: dict[str, torch.Tensor], keys: dict[str, LdmKey]) -> dict[str, torch.Tensor]:
    """Rewrite a diffusers ``state_dict`` into single-file tensors (fusing parts, adding 1×1 dims)."""
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        key = keys[name]
        value = tensor[..., None, None] if key.conv1x1 else tensor
        if key.parts == 1:
            out[key.name] = value.contiguous()
        else:
            grouped.setdefault(key.name, {})[key.part] = value
    for name, parts in grouped.items():
        out[name] = torch.cat([parts[i] for i in sorted(parts)], dim=0).contiguous()
    return out
