"""Tune the 4-step consistency preset of the bundled model on tuning cases (issue 35).

    python benchmarks/quality/consistency_preset/tune.py --per-kind 8 --out tune.json \
        --files runs/cycle_r16 [--variants authors w3 ...]

The cases are the quality benchmark's edit kinds drawn from seeds 9,500,000 + i: disjoint from the
benchmark's 9,000,000 + i, as the ``shapes`` preset was tuned (benchmarks/quality/README.md). Each
case is inverted once (the consistency editor caches the inversion and source passes per image and
source prompt) and edited by every variant; an edit succeeds when the judge reads the target's
attributes, and the kept region is scored by its PSNR against the source, exactly as
``gnr-fast eval`` scores it. ``success_unmatched`` judges the plain VAE decode of the edited latent,
before the colour-statistics matching the consistency edit applies (the authors' post-processing). ``--files DIR`` takes the teacher / reverse / forward files of a
training run (``teacher.pt`` is looked for in DIR, else ``--teacher``) instead of the model's own.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import torch

from gnr_fast.config import CfgGuider, EditConfig, FeaturesMapL2, RescaleConfig, SelfAttnMapL2
from gnr_fast.editor import Editor
from gnr_fast.model_files import BUNDLED_MODEL
from gnr_shapes.evaluation.cases import EDIT_KINDS, make_case
from gnr_shapes.evaluation.metrics import masked_psnr
from gnr_shapes.evaluation.quality import judge_success
from gnr_shapes.world.judge import load_judge

TUNING_SEED = 9_500_000
"""First seed of the tuning cases (the benchmark's start at 9,000,000)."""


def variant(w: tuple[float, ...], features: float = 0.5, self_attn: float = 20000.0,
            rescale: tuple[float, float] = (0.0, 1.0)) -> Callable[[], EditConfig]:
    """A 4-step GaR config: guidance scale ``w`` per step, the authors' guiders at these scales."""
    def build() -> EditConfig:
        guiders = [CfgGuider(scale=w)]
        if features:
            guiders.append(FeaturesMapL2(scale=features, block="up"))
        if self_attn:
            guiders.append(SelfAttnMapL2(scale=(0.0, self_attn, self_attn, self_attn)))
        return EditConfig(guiders=tuple(guiders), rescale=RescaleConfig("range_other_on_cfg_norm", *rescale),
                          num_steps=4)
    return build


def cfg_only(w: tuple[float, ...]) -> Callable[[], EditConfig]:
    """The prompt switch with guidance scale ``w`` per step and no guiders (no rescaling)."""
    return lambda: EditConfig(guiders=(CfgGuider(scale=w),), rescale=RescaleConfig("identity_rescaler"), num_steps=4)


VARIANTS: dict[str, Callable[[], EditConfig]] = {
    "authors": lambda: EditConfig.consistency(4),
    "cfg-only-w3": cfg_only((0.0, 3.0, 3.0, 3.0)),
    "cfg-only-w5": cfg_only((0.0, 5.0, 5.0, 5.0)),
    "cfg-only-w7": cfg_only((0.0, 7.0, 7.0, 7.0)),
    "cfg-only-w7-all": cfg_only((7.0, 7.0, 7.0, 7.0)),
    "cfg-only-w11": cfg_only((0.0, 11.0, 11.0, 11.0)),
    "w3-sa1k": variant((0.0, 3.0, 3.0, 3.0), self_attn=1000.0),
    "w7-sa1k": variant((0.0, 7.0, 7.0, 7.0), self_attn=1000.0),
    "shapes-4step": lambda: EditConfig.shapes(4),
    "w7-f0-sa1k": variant((0.0, 7.0, 7.0, 7.0), features=0.0, self_attn=1000.0),
    "w3": variant((0.0, 3.0, 3.0, 3.0)),
    "w3-all": variant((3.0, 3.0, 3.0, 3.0)),
    "w5": variant((0.0, 5.0, 5.0, 5.0)),
    "w7": variant((0.0, 7.0, 7.0, 7.0)),
    "w3-sa5k": variant((0.0, 3.0, 3.0, 3.0), self_attn=5000.0),
    "w5-sa5k": variant((0.0, 5.0, 5.0, 5.0), self_attn=5000.0),
    "w7-sa5k": variant((0.0, 7.0, 7.0, 7.0), self_attn=5000.0),
    "w7-11-19-sa5k": variant((0.0, 7.0, 11.0, 19.0), self_attn=5000.0),
    "w5-sa50k": variant((0.0, 5.0, 5.0, 5.0), self_attn=50000.0),
    "w5-f2": variant((0.0, 5.0, 5.0, 5.0), features=2.0),
}


@torch.no_grad()
def plain_decode(editor: Editor, latents: torch.Tensor) -> np.ndarray:
    """uint8 [H, W, 3] VAE decode of an edited latent, without the colour-statistics matching."""
    vae = editor.components.vae
    image = vae.decode(latents.to(vae.dtype) / editor.components.scaling_factor).sample[0].float()
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def run(editor: Editor, judge, kinds: tuple[str, ...], per_kind: int,
        names: list[str], out: Path) -> list[dict]:
    """Every variant on every tuning case: one row per (case, variant), written to ``out`` (JSON)
    after each case, so that a long run can be read while it goes."""
    rows = []
    for i in range(per_kind):
        for kind in kinds:
            case = make_case(kind, TUNING_SEED + i, size=128)
            for name in names:
                start = time.perf_counter()
                result = editor.edit(case.source.image, case.target.caption, source_prompt=case.source.caption,
                                     config=VARIANTS[name](), progress=False)
                image = np.asarray(result.image)
                rows.append({"kind": kind, "seed": case.seed, "variant": name,
                             "success": judge_success(judge, image, case),
                             "success_unmatched": judge_success(judge, plain_decode(editor, result.latents), case),
                             "psnr_keep": masked_psnr(image, case.source.image, case.keep_mask),
                             "seconds": time.perf_counter() - start})
            out.write_text(json.dumps(rows, indent=1))
    return rows


def summary(rows: list[dict]) -> str:
    """A markdown table: success % / kept-region PSNR per variant and kind."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    lines = ["| variant | " + " | ".join(kinds) + " | all |", "| --- |" + " --- |" * (len(kinds) + 1)]
    for name in names:
        cells = []
        for kind in kinds + [None]:
            sel = [r for r in rows if r["variant"] == name and (kind is None or r["kind"] == kind)]
            cells.append(f"{100 * np.mean([r['success'] for r in sel]):.0f} % / "
                         f"{np.mean([r['psnr_keep'] for r in sel]):.1f} dB")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: prints the table and writes the rows to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    p.add_argument("--files", type=Path, default=None, help="a run folder with reverse/forward LoRA files")
    p.add_argument("--teacher", type=Path, default=None, help="teacher.pt when --files has none")
    p.add_argument("--per-kind", type=int, default=8)
    p.add_argument("--kinds", nargs="+", default=list(EDIT_KINDS), choices=EDIT_KINDS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    files = {}
    if args.files is not None:
        teacher = args.files / "teacher.pt" if (args.files / "teacher.pt").exists() else args.teacher
        files = {"teacher_unet": teacher, "reverse_lora": args.files / "reverse_lora.safetensors",
                 "forward_lora": args.files / "forward_lora.safetensors"}
    editor = Editor.from_pretrained(args.model, sampler="consistency", dtype=torch.float32, **files)
    rows = run(editor, load_judge(), tuple(args.kinds), args.per_kind, args.variants, args.out)
    print(summary(rows))


if __name__ == "__main__":
    main()
