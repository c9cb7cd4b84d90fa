"""Single-file checkpoint → diffusers pipeline folder, so a file is parsed and checked once (``gnr-fast convert``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .single_file import load_single_file

logger = logging.getLogger(__name__)


def convert_single_file(
    path: str | Path,
    out: str | Path,
    prediction_type: str | None = None,
    config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the single-file checkpoint ``path`` as a diffusers StableDiffusionPipeline folder ``out``.

    The folder holds the converted weights (safetensors) in ``dtype`` (default: the file's own, e.g.
    float16), the architecture configs that loaded it, the tokenizer and a DDIM scheduler config
    with the chosen prediction type; loading it later gives the same model (and model id) as the
    file. ``prediction_type`` and ``config`` are those of :func:`load_single_file`. Refuses to
    write into an existing non-empty ``out`` unless ``overwrite``.
    """
    path, out = Path(path), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelLoadError(f"--out {str(out)!r} exists and is not empty; choose a new folder or pass --force.")
    modules = load_single_file(path, dtype=dtype, prediction_type=prediction_type, config=config)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True)
    modules.unet.save_pretrained(out / "unet")
    modules.vae.save_pretrained(out / "vae")
    modules.text_encoder.save_pretrained(out / "text_encoder")
    modules.tokenizer.save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(modules.scheduler_config, indent=2) + "\n")
    index = modules.config_dir / "model_index.json"
    if index.is_file():
        shutil.copyfile(index, out / "model_index.json")
    else:
        shutil.copyfile(Path(__file__).parent / "configs" / "sd1" / "model_index.json", out / "model_index.json")
    logger.info("converted %s (%s) to %s in %s", path, modules.architecture, out, modules.dtype)
    return out
