"""The golden tiny consistency model (../shared/golden/tiny-icd, read-only) as a model folder with our
``gnr_fast.json``: a folder of symlinks to its entries plus the metadata file."""

from __future__ import annotations

import json
from pathlib import Path

TINY_ICD_METADATA = {
    "format": 1,
    "preset": "consistency",
    "sampler": "consistency",
    "consistency": {
        "teacher_unet": "teacher.pt",
        "reverse_lora": "reverse_lora.safetensors",
        "forward_lora": "forward_lora.safetensors",
    },
}


def consistency_model_dir(golden_dir: Path, dest: Path, metadata: dict | None = TINY_ICD_METADATA) -> Path:
    """``dest`` holding a symlink to every entry of tiny-icd and ``metadata`` as gnr_fast.json (None: no file)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in (golden_dir / "tiny-icd").iterdir():
        (dest / entry.name).symlink_to(entry.resolve())
    if metadata is not None:
        (dest / "gnr_fast.json").write_text(json.dumps(metadata))
    return dest
