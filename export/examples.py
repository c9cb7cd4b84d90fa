"""Writes the examples under ``export/`` with the code the export commands run, so each file shows
exactly what ``gnr-fast export triton-repo`` and ``gnr-fast export tensorrt`` produce:

- ``triton_repo/cpu/``, ``triton_repo/gpu/`` and ``triton_repo/cpu_consistency/`` (its 4-step
  consistency edit): model repositories of the bundled model
  (:func:`gnr_fast.serving.triton_repo.write_repository`), ready for ``tritonserver
  --model-repository=export/triton_repo/cpu`` in an environment where gnr-fast is installed;
- ``tensorrt/profiles.json``: the optimisation profiles (rows per plain call, and the input shapes
  they give) that ``gnr-fast export tensorrt`` builds for the default ONNX export of an SD 1.x model
  (``gnr-fast export onnx``: 512², batch 1–4), for every preset together and for each alone
  (:func:`gnr_fast.runtime.tensorrt.engine.profiles_from_plans`).

Run ``python export/examples.py`` after changing what those commands write;
``tests/serving/test_export_examples.py`` fails while a file here is stale. The commands never read
these files: the installed package writes from its own code, so a wheel needs nothing from here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from gnr_fast.config import PRESET_NAMES, EditConfig
from gnr_fast.runtime.export_info import ExportInfo
from gnr_fast.runtime.tensorrt.engine import profiles_from_plans
from gnr_fast.serving.triton_repo import RepoConfig, write_repository

HERE = Path(__file__).resolve().parent

TRITON_REPOS = {
    "triton_repo/cpu": RepoConfig(),
    "triton_repo/gpu": RepoConfig(device="cuda", dtype="float16", instances=2),
    "triton_repo/cpu_consistency": RepoConfig(sampler="consistency"),
}
"""Example folder → the repository it holds (the commands in ``triton_repo/README.md``)."""

SD1_DEFAULT_EXPORT = ExportInfo(
    unet_id="", dtype="float32", latent_sizes=((64, 64),), min_batch=1, max_batch=4, in_channels=4,
    out_channels=4, context_len=77, context_dim=768, exporter="torchscript", opset=18, gnr_fast_version="",
)
"""What ``gnr-fast export onnx`` records for an SD 1.x UNet with its defaults (512², batch 1–4);
the fields left empty do not enter the profiles."""

PROFILE_STEPS = 50


def profile_table(info: ExportInfo = SD1_DEFAULT_EXPORT, num_steps: int = PROFILE_STEPS) -> dict:
    """The profiles ``gnr-fast export tensorrt`` builds from ``info``: for every preset together
    (its default) and for each ``--preset`` alone."""
    choices = {"every preset": PRESET_NAMES, **{name: (name,) for name in PRESET_NAMES}}
    table = {}
    for label, names in choices.items():
        profiles = profiles_from_plans(info, [EditConfig.preset(n, num_steps) for n in names], num_steps)
        table[label] = [{**asdict(p), "shapes": p.shapes(info)} for p in profiles]
    return {
        "export": {"latent_sizes": info.latent_sizes, "batch": [info.min_batch, info.max_batch],
                   "context": [info.context_len, info.context_dim]},
        "num_steps": num_steps,
        "profiles": table,
    }


def table_json(table: dict) -> str:
    """``table`` as JSON with one line per profile list (the lists of numbers stay on one line)."""
    rows = [f"  {json.dumps(label)}: {json.dumps(profiles)}" for label, profiles in table["profiles"].items()]
    return (f'{{\n "export": {json.dumps(table["export"])},\n "num_steps": {table["num_steps"]},\n'
            f' "profiles": {{\n' + ",\n".join(rows) + "\n }\n}\n")


def write_examples(root: Path = HERE) -> list[Path]:
    """Write every example under ``root`` (replacing the old ones); returns the files written."""
    for folder, config in TRITON_REPOS.items():
        write_repository(config, root / folder, overwrite=True)
    profiles = root / "tensorrt" / "profiles.json"
    profiles.parent.mkdir(parents=True, exist_ok=True)
    profiles.write_text(table_json(profile_table()))
    return sorted(p for folder in [*TRITON_REPOS, "tensorrt"] for p in (root / folder).rglob("*") if p.is_file())


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for path in write_examples(out):
        print(path)
