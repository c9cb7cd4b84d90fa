"""Parity against a golden run of the authors' reference implementation (``shared/golden``).

Two comparisons (see the golden README): *teacher-forced* — every step is fed the golden latent
and source trajectory and its terms are compared —, and *free-running* — a whole edit from the
input image compared with the golden final latent and image. Run as
``python tests/parity.py GOLDEN_RUN_DIR --model TINY_SD_DIR`` from the repository root; the tests
(``tests/golden/test_golden_parity.py``) call the same functions and import :func:`rel_err` from here.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gnr_fast.config import EditConfig
from gnr_fast.editing import EditContext, StepFunction, source_latent
from gnr_fast.editor import Editor
from gnr_fast.schedules import ddim_step_up, ddim_timesteps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖₂ / ‖b‖₂ over the whole tensor (0 when both are zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = torch.linalg.vector_norm(b).item()
    diff = torch.linalg.vector_norm(a - b).item()
    return diff / denom if denom else diff


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@dataclass
class GoldenRun:
    """A golden run folder: tensors, prompts, input and edited images."""

    tensors: dict[str, torch.Tensor]
    source_prompt: str
    target_prompt: str
    preset: str
    input_path: Path
    edited: np.ndarray

    @classmethod
    def load(cls, folder: str | Path) -> "GoldenRun":
        folder = Path(folder)
        meta = json.loads((folder / "golden.json").read_text())
        return cls(
            tensors=torch.load(folder / "golden.pt", map_location="cpu", weights_only=True),
            source_prompt=meta["source_prompt"],
            target_prompt=meta["target_prompt"],
            preset=meta["preset"],
            input_path=folder / "input.png",
            edited=np.asarray(Image.open(folder / "edited.png").convert("RGB")),
        )

    @property
    def num_steps(self) -> int:
        return int(self.tensors["eps_final"].shape[0])


@dataclass
class StepComparison:
    """Relative errors of one teacher-forced step's terms against the golden ones."""

    step: int
    eps_u: float
    delta_cfg: float
    guider_grad: float  # 0 where neither side ran a backward
    gamma: float
    eps_final: float
    grad_presence_matches: bool  # both or neither side ran a backward
    guider_grad_value: torch.Tensor | None = None  # ours, for noise-floor comparisons


def teacher_forced_inversion(editor: Editor, golden: GoldenRun) -> float:
    """Max over steps of the relative error of one inversion step fed the golden latent."""
    g = golden.tensors["inv_latents"]
    n = golden.num_steps
    schedule = editor.components.schedule
    timesteps = ddim_timesteps(n, schedule.num_train_timesteps)
    c_src = editor.embed(golden.source_prompt)
    dtype = editor.components.dtype
    worst = 0.0
    with torch.no_grad():
        for i in range(n):
            t = timesteps[n - 1 - i]
            z = g[i].to(dtype)
            z_next = ddim_step_up(schedule, editor.runner.plain(z, torch.tensor(int(t), device=z.device), c_src), t, z, n)
            worst = max(worst, rel_err(z_next, g[i + 1]))
    return worst


def teacher_forced_edit(
    editor: Editor,
    golden: GoldenRun,
    step_fn: StepFunction,
    config: EditConfig | None = None,
    steps: Iterable[int] | None = None,
) -> list[StepComparison]:
    """Feed the golden latent of each step in ``steps`` (default: every step) to ``step_fn`` and
    compare all terms with the golden ones; one row per step, in the order given."""
    g = golden.tensors
    dtype = editor.components.dtype
    config = config or EditConfig.preset(golden.preset, golden.num_steps)
    ctx = EditContext.build(
        editor.components,
        editor.runner,
        config,
        editor.self_attn_layers,
        editor.embed(""),
        editor.embed(golden.source_prompt),
        editor.embed(golden.target_prompt),
    )
    rows = []
    for i in range(golden.num_steps) if steps is None else steps:
        z_star = source_latent(g["inv_latents"], i, config).to(dtype)
        terms = step_fn(ctx, g["latents"][i].to(dtype), z_star, i)
        golden_has_grad = bool(g["guider_grad"][i].abs().max() > 0)
        both = terms.guider_grad is not None and golden_has_grad
        rows.append(
            StepComparison(
                step=i,
                eps_u=rel_err(terms.eps_u, g["eps_uncond"][i]),
                delta_cfg=rel_err(terms.delta_cfg, g["delta_cfg"][i]),
                guider_grad=rel_err(terms.guider_grad, g["guider_grad"][i]) if both else 0.0,
                gamma=abs(float(terms.gamma) - float(g["gamma"][i])) / abs(float(g["gamma"][i])),
                eps_final=rel_err(terms.eps_final, g["eps_final"][i]),
                grad_presence_matches=(terms.guider_grad is not None) == golden_has_grad,
                guider_grad_value=None if terms.guider_grad is None else terms.guider_grad.detach(),
            )
        )
    return rows


def summarize(rows: list[StepComparison]) -> dict[str, float]:
    """Worst error of each term over the steps, and the median of the guider-gradient errors."""
    grads = sorted(r.guider_grad for r in rows if r.guider_grad_value is not None)
    return {
        "eps_u": max(r.eps_u for r in rows),
        "delta_cfg": max(r.delta_cfg for r in rows),
        "guider_grad": max(grads, default=0.0),
        "guider_grad_median": grads[len(grads) // 2] if grads else 0.0,
        "gamma": max(r.gamma for r in rows),
        "eps_final": max(r.eps_final for r in rows),
        "grad_presence_mismatches": sum(not r.grad_presence_matches for r in rows),
    }


@dataclass
class FreeRunning:
    """A whole edit from the golden input compared with the golden outputs."""

    inversion_rel: float  # whole trajectory
    final_latent_rel: float
    image_psnr_db: float
    seconds: float


def free_running(editor: Editor, golden: GoldenRun, mode: str = "reference") -> FreeRunning:
    """Run the whole edit from ``input.png`` and compare trajectory, final latent and image."""
    start = time.perf_counter()
    result = editor.edit(
        golden.input_path, golden.target_prompt, source_prompt=golden.source_prompt, preset=golden.preset,
        mode=mode, progress=False,
    )
    seconds = time.perf_counter() - start
    return FreeRunning(
        inversion_rel=rel_err(result.inversion.latents, golden.tensors["inv_latents"]),
        final_latent_rel=rel_err(result.latents, golden.tensors["latents"][-1]),
        image_psnr_db=psnr(np.asarray(result.image), golden.edited),
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="compare gnr-fast with a golden reference run")
    parser.add_argument("run", help="golden run folder (golden.pt, golden.json, input.png, edited.png)")
    parser.add_argument("--model", required=True, help="the model folder the golden run used")
    parser.add_argument("--mode", default="reference", choices=("reference", "fast"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the golden run's rounding: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    editor = Editor.from_pretrained(args.model)
    golden = GoldenRun.load(args.run)
    if args.mode == "fast":
        from gnr_fast.fast.step import fast_step as step_fn
    else:
        from gnr_fast.reference.step import reference_step as step_fn

    report = {
        "teacher_forced_inversion_max_step_rel": teacher_forced_inversion(editor, golden),
        "teacher_forced_edit": summarize(teacher_forced_edit(editor, golden, step_fn)),
        "free_running": asdict(free_running(editor, golden, args.mode)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
