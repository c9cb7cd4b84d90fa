"""LoRA adapters as the consistency-model checkpoints distribute them, fused into a UNet once at load.

The file layout is PEFT's (``get_peft_model_state_dict`` saved as safetensors): for every targeted
module ``<path>`` of the UNet, ``unet.base_model.model.<path>.lora_A.weight`` (the "down" matrix,
[r, in] or [r, in, kh, kw] for a conv) and ``….lora_B.weight`` (the "up" matrix, [out, r] or
[out, r, 1, 1]). Fusing follows the Inverse-and-Edit loader (README_consistency.md §1): both
matrices rounded to float16, an alpha forced to 8 whatever the rank, then in float32

    W' = W + (alpha / r) · (fp16(B) @ fp16(A))      (a conv: B[:, :, 0, 0] @ A.reshape(r, -1), reshaped)

Biases and modules the file does not name are left as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptCheckpointError, ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)

PEFT_PREFIX = "unet.base_model.model."
"""Key prefix of a PEFT UNet LoRA saved through ``save_lora_weights``."""
DEFAULT_LORA_ALPHA = 8.0
"""The alpha the Inverse-and-Edit loader gives every module, whatever the rank or the file says."""
_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up"}


@dataclass(frozen=True)
class LoraPair:
    """One module's low-rank update: ``down`` [r, in(, kh, kw)], ``up`` [out, r(, 1, 1)]."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def read_lora(path: str | Path) -> dict[str, LoraPair]:
    """The LoRA pairs of a PEFT safetensors file, by UNet module path.

    Raises :class:`ModelNotFoundError` for a missing file, :class:`CorruptCheckpointError` for a
    file that is not safetensors, and :class:`ModelLoadError` for keys outside the PEFT UNet layout,
    a module with only one of its two matrices, or two matrices whose ranks differ.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"LoRA file {str(path)!r} does not exist; pass the path of the .safetensors file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"LoRA file {str(path)!r} is not a readable safetensors file: {exc}") from exc
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PEFT_PREFIX) or suffix is None:
            raise ModelLoadError(
                f"LoRA file {str(path)!r}: key {key!r} is not in the PEFT UNet layout "
                f"('{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'); convert the file to that layout"
            )
        module = key[len(PEFT_PREFIX) : -len(suffix)]
        halves.setdefault(module, {})[_SUFFIXES[suffix]] = tensor
    if not halves:
        raise ModelLoadError(f"LoRA file {str(path)!r} holds no tensors")
    pairs = {}
    for module, half in sorted(halves.items()):
        if set(half) != {"down", "up"}:
            raise ModelLoadError(f"LoRA file {str(path)!r}: module {module!r} has only its lora_"
                                 f"{'A' if 'down' in half else 'B'} matrix; the file is incomplete")
        down, up = half["down"], half["up"]
        if up.dim() < 2 or down.shape[0] != up.shape[1]:
            raise ModelLoadError(
                f"LoRA file {str(path)!r}: module {module!r} has lora_A of rank {down.shape[0]} but lora_B of shape "
                f"{tuple(up.shape)} (rank mismatch); the file is corrupt"
            )
        pairs[module] = LoraPair(down=down, up=up)
    return pairs


def lora_delta(pair: LoraPair, weight_shape: torch.Size, alpha: float) -> torch.Tensor:
    """(alpha / r) · (fp16(B) @ fp16(A)) in float32, shaped like the weight (1×1 form for a conv)."""
    down = pair.down.to(torch.float16).to(torch.float32)
    up = pair.up.to(torch.float16).to(torch.float32)
    if len(weight_shape) == 4:  # conv: B [out, r, 1, 1], A [r, in, kh, kw]
        product = up[:, :, 0, 0] @ down.reshape(pair.rank, -1)  # [out, in·kh·kw]
    else:
        product = up @ down  # [out, in]
    return (alpha / pair.rank) * product.reshape(weight_shape)


def fuse_lora(unet: torch.nn.Module, pairs: dict[str, LoraPair], alpha: float = DEFAULT_LORA_ALPHA,
              source: str = "LoRA") -> None:
    """Add every pair's update to the weight of its module of ``unet``, in place (float32 arithmetic).

    All pairs are checked before any weight changes: a module path ``unet`` lacks, a module without
    a weight, or matrices whose shapes do not fit the weight (a LoRA made for another architecture)
    raise :class:`ModelLoadError` naming ``source``, and ``unet`` is left untouched.
    """
    modules = dict(unet.named_modules())
    targets = []
    for name, pair in pairs.items():
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ModelLoadError(
                f"{source}: module {name!r} is not a weighted layer of this UNet; the LoRA was made for another "
                "architecture (use the LoRA trained for this teacher UNet)"
            )
        shape = weight.shape
        conv = len(shape) == 4
        down_ok = pair.down.shape == ((pair.rank, *shape[1:]) if conv else (pair.rank, shape[1]))
        up_ok = pair.up.shape == ((shape[0], pair.rank, 1, 1) if conv else (shape[0], pair.rank))
        if not (down_ok and up_ok):
            raise ModelLoadError(
                f"{source}: module {name!r} has weight {tuple(shape)} but LoRA matrices A {tuple(pair.down.shape)}, "
                f"B {tuple(pair.up.shape)}; the LoRA was made for another architecture"
            )
        targets.append((weight, pair))
    with torch.no_grad():
        for weight, pair in targets:
            delta = lora_delta(pair, weight.shape, alpha).to(weight.device)
            weight.copy_((weight.float() + delta).to(weight.dtype))
    logger.info("%s: fused %d LoRA modules (alpha %g, rank %s)", source, len(targets), alpha,
                sorted({p.rank for p in pairs.values()}))
