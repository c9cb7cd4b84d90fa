"""What a quality-benchmark run reports per case, and the pieces its reports share: the per-case
records of the JSON files, the picture grid of example edits."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .cases import EditCase


@dataclass
class CaseResult:
    """One method on one case.

    ``seconds``: the edit alone (the inversion excluded); ``first_edit_seconds``: a first edit of the
    image — its inversion (at the method's sampler and steps) plus the edit; ``inversion_psnr``: PSNR
    of the inversion's reconstruction (:func:`~gnr_shapes.evaluation.methods.reconstruction_config`)
    against the source image, NaN when the run did not reconstruct.
    """

    kind: str
    seed: int
    method: str
    success: bool
    psnr_keep: float
    ssim_keep: float
    perceptual: float
    seconds: float
    image: np.ndarray = field(repr=False)
    form: str = "full"  # caption form of the prompts (world.captions.CAPTION_FORMS)
    sampler: str = "ddim"
    steps: int = 0
    first_edit_seconds: float = math.nan
    inversion_psnr: float = math.nan


def case_records(results: list[CaseResult]) -> list[dict]:
    """Every result's numbers and labels (its fields but the image), as written to the reports' JSON."""
    return [{k: v for k, v in asdict(r).items() if k != "image"} for r in results]


def picture_grid(cases: list[EditCase], results: list[CaseResult], rows_per_kind: int = 3) -> Image.Image:
    """Rows of source | target truth | each method's edit, ``rows_per_kind`` cases per kind."""
    methods = list(dict.fromkeys(r.method for r in results))
    by_key = {(r.kind, r.seed, r.method): r.image for r in results}
    chosen = [c for kind in dict.fromkeys(c.kind for c in cases) for c in [c for c in cases if c.kind == kind][:rows_per_kind]]
    side = cases[0].source.image.shape[0]
    header = 14
    grid = Image.new("RGB", ((2 + len(methods)) * side, header + len(chosen) * side), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(["source", "target (truth)", *methods]):
        draw.text((col * side + 2, 1), title, fill="black")
    for row, case in enumerate(chosen):
        tiles = [case.source.image, case.target.image] + [by_key[(case.kind, case.seed, m)] for m in methods]
        for col, tile in enumerate(tiles):
            grid.paste(Image.fromarray(tile), (col * side, header + row * side))
    return grid
