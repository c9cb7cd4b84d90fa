"""Trainable LoRA adapters on a UNet, saved in the PEFT layout the consistency loader reads.

Each targeted Linear / Conv2d weight W is re-parametrised as W + (alpha / r) · B @ A (a conv's A
has the conv's kernel, B is 1×1), which is exactly the weight :func:`gnr_fast.lora.fuse_lora`
builds at load, so training sees the fused model (up to the float16 rounding of A and B that the
loader applies). A starts Kaiming-uniform, B at zero: a fresh adapter leaves the UNet unchanged.
The targets are the Inverse-and-Edit training script's ``lora_modules`` (PEFT's rule: a module whose
name is, or ends with ``.`` + one of, :data:`LORA_TARGETS`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from gnr_fast.lora import DEFAULT_LORA_ALPHA, PEFT_PREFIX

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


class LoraDelta(torch.nn.Module):
    """Parametrization W -> W + scale · B @ A for one Linear or Conv2d weight."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        fan_in = int(math.prod(weight.shape[1:]))
        bound = 1.0 / math.sqrt(fan_in)  # Kaiming-uniform with a = sqrt(5), as torch's Linear / PEFT
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank) + ((1, 1) if weight.dim() == 4 else ())
        self.lora_A = torch.nn.Parameter((torch.rand(down_shape, generator=generator) * 2 - 1) * bound)
        self.lora_B = torch.nn.Parameter(torch.zeros(up_shape))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rank = self.lora_A.shape[0]
        product = self.lora_B.reshape(weight.shape[0], rank) @ self.lora_A.reshape(rank, -1)
        return weight + self.scale * product.reshape(weight.shape)


def lora_target_names(unet: torch.nn.Module) -> list[str]:
    """Module paths of ``unet`` that an adapter targets (sorted as ``named_modules`` yields them)."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == t or name.endswith("." + t) for t in LORA_TARGETS)]


def attach_lora(unet: torch.nn.Module, rank: int, seed: int,
                alpha: float = DEFAULT_LORA_ALPHA) -> dict[str, LoraDelta]:
    """Freeze ``unet`` and re-parametrise every targeted weight with a fresh adapter; returns the
    adapters by module path (their ``lora_A`` / ``lora_B`` are the only trainable parameters)."""
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    adapters = {}
    for name in lora_target_names(unet):
        delta = LoraDelta(modules[name].weight.detach(), rank, alpha, generator)
        parametrize.register_parametrization(modules[name], "weight", delta)
        adapters[name] = delta
    return adapters


def lora_parameters(adapters: dict[str, LoraDelta]) -> list[torch.nn.Parameter]:
    """The trainable factors of ``adapters``, in a fixed order."""
    return [p for name in sorted(adapters) for p in (adapters[name].lora_A, adapters[name].lora_B)]


def peft_state_dict(adapters: dict[str, LoraDelta]) -> dict[str, torch.Tensor]:
    """The adapters as a PEFT UNet LoRA state dict (float32, contiguous), the authors' file layout."""
    state = {}
    for name in sorted(adapters):
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = adapters[name].lora_A.detach().float().contiguous().clone()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = adapters[name].lora_B.detach().float().contiguous().clone()
    return state


def load_peft_state_dict(adapters: dict[str, LoraDelta], state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`peft_state_dict` back into ``adapters`` (resume)."""
    with torch.no_grad():
        for name, delta in adapters.items():
            delta.lora_A.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            delta.lora_B.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])


def save_lora_file(path: Path, adapters: dict[str, LoraDelta]) -> Path:
    """Write ``adapters`` to ``path`` as PEFT-layout safetensors, atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(peft_state_dict(adapters), str(tmp))
    os.replace(tmp, path)
    return path
