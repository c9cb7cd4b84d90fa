"""Ship a teacher and two consistency LoRAs into a model folder and declare them in its ``gnr_fast.json``.

    python -m gnr_shapes.training.export_consistency --model gnr_fast/models/shapes-v1 \
        --teacher runs/cfg_teacher/teacher.pt --forward-lora runs/cycle_r16/forward_lora.safetensors \
        --zero-reverse-rank 1 --preset shapes_consistency

Writes ``<model>/consistency/teacher.pt`` (the teacher state dict as it is, float32),
``reverse_lora.safetensors`` and ``forward_lora.safetensors`` (PEFT layout, A and B stored in
float16: the engine's loader rounds them to float16 before fusing, so the fused UNets do not
change). Without ``--reverse-lora`` the reverse file is a *zero* LoRA of rank
``--zero-reverse-rank`` (B = 0): the reverse consistency model is then the teacher itself, 4 jumps
of its own ε. Then sets the folder's ``gnr_fast.json`` ``consistency`` object (files, alpha 8, the
boundaries, ``--preset``) and leaves ``sampler`` as it is, so a DDIM folder keeps DDIM as its
default and *offers* the consistency sampler (``docs/consistency-models.md``). Every file is
loaded back through the engine's loader before the JSON is written.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from gnr_fast.consistency_models import ConsistencyFiles, load_consistency_unets, load_guidance_unet
from gnr_fast.lora import DEFAULT_LORA_ALPHA, PEFT_PREFIX, read_lora
from gnr_fast.model_defaults import CONSISTENCY_TIMESTEPS, METADATA_NAME, load_model_defaults
from gnr_shapes.training.lora_adapters import attach_lora, peft_state_dict

FOLDER = "consistency"
"""Subfolder of the model folder that holds the three files."""
FILES = {"teacher_unet": "teacher.pt", "reverse_lora": "reverse_lora.safetensors",
         "forward_lora": "forward_lora.safetensors"}


def save_half_lora(state: dict[str, torch.Tensor], path: Path) -> Path:
    """``state`` (a PEFT LoRA state dict) written as float16 safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))
    return path


def lora_file_state(path: Path) -> dict[str, torch.Tensor]:
    """The PEFT state dict of a LoRA file, read through the engine's loader (which validates it)."""
    return {f"{PEFT_PREFIX}{module}.lora_{ab}.weight": getattr(pair, attr)
            for module, pair in read_lora(path).items() for ab, attr in (("A", "down"), ("B", "up"))}


def zero_lora_state(unet_config: dict, teacher: Path, rank: int) -> dict[str, torch.Tensor]:
    """A LoRA of ``rank`` on every targeted module with B = 0: fused, it leaves the teacher unchanged."""
    unet = load_guidance_unet(unet_config, teacher)
    return peft_state_dict(attach_lora(unet, rank, seed=0))


def export(model: Path, teacher: Path, forward_lora: Path, reverse_lora: Path | None, zero_rank: int,
           preset: str) -> Path:
    """Copy / write the three files into ``model/consistency`` and declare them; returns the JSON path."""
    unet_config = dict(UNet2DConditionModel.load_config(model / "unet"))
    out = model / FOLDER
    out.mkdir(exist_ok=True)
    shutil.copyfile(teacher, out / FILES["teacher_unet"])
    save_half_lora(lora_file_state(forward_lora), out / FILES["forward_lora"])
    reverse = zero_lora_state(unet_config, teacher, zero_rank) if reverse_lora is None else lora_file_state(reverse_lora)
    save_half_lora(reverse, out / FILES["reverse_lora"])
    load_consistency_unets(unet_config, ConsistencyFiles(*(out / FILES[k] for k in FILES)))  # raises on a bad file
    path = model / METADATA_NAME
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"format": 1}
    data["consistency"] = {**{k: f"{FOLDER}/{v}" for k, v in FILES.items()}, "lora_alpha": DEFAULT_LORA_ALPHA,
                           "timesteps": list(CONSISTENCY_TIMESTEPS), "preset": preset}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    load_model_defaults(model)  # raises on a malformed result
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the model folder to ship into")
    p.add_argument("--teacher", type=Path, required=True, help="guidance-distilled teacher state dict (.pt)")
    p.add_argument("--forward-lora", type=Path, required=True)
    p.add_argument("--reverse-lora", type=Path, default=None, help="default: a zero LoRA (the teacher itself)")
    p.add_argument("--zero-reverse-rank", type=int, default=1)
    p.add_argument("--preset", default="consistency", help="the folder's consistency preset")
    args = p.parse_args(argv)
    print(export(args.model, args.teacher, args.forward_lora, args.reverse_lora, args.zero_reverse_rank, args.preset))


if __name__ == "__main__":
    main()
