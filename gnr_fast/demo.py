"""``gnr-fast demo``: a real edit of the bundled example image with the bundled model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import ALL_PRESET_NAMES

EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "example.png"
"""A shapes-world scene (a large red circle on a plain blue background, 128²) shipped with the package."""
DEMO_SOURCE = "a large red circle on a blue background"  # the world's caption grammar
DEMO_TARGET = "a large yellow circle on a blue background"
DEMO_STEPS = 50
"""DDIM steps of the demo's default edit."""


def add_parser(sub, add_model_args) -> None:
    demo = sub.add_parser("demo", help="edit the bundled example image with the bundled model")
    demo.add_argument("-o", "--out", default="gnr-fast-demo.png", help="side-by-side PNG (default gnr-fast-demo.png)")
    demo.add_argument("--steps", type=int, default=None,
                      help="DDIM steps (default 50; a consistency edit takes its model's 4)")
    demo.add_argument("--mode", default=None, help="execution mode (default: the library's default)")
    demo.add_argument("--preset", default=None, choices=ALL_PRESET_NAMES,
                      help="guidance preset (default: the model's, 'shapes' for the bundled model; with "
                           "--sampler consistency its consistency preset, 'shapes_consistency')")
    add_model_args(demo)


def run(args: argparse.Namespace, editor) -> int:
    """Edit the example (resized to the model's native size) and write input | edit side by side."""
    from PIL import Image

    size = editor.components.unet.config.sample_size * editor.components.latent_factor
    with Image.open(EXAMPLE_IMAGE) as example:
        source = example.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    kwargs = {"mode": args.mode} if args.mode else {}
    few_step = getattr(args, "sampler", None) == "consistency"
    steps = args.steps if args.steps is not None or few_step else DEMO_STEPS  # a consistency model takes its 4
    preset = args.preset or editor.default_preset  # the model's gnr_fast.json: 'shapes', or 'shapes_consistency'
    label = ("4-step consistency edit, " if few_step else "") + f"{preset} preset"
    result = editor.edit(source, DEMO_TARGET, source_prompt=DEMO_SOURCE, num_steps=steps, preset=preset,
                         progress=not args.quiet, **kwargs)
    side = Image.new("RGB", (2 * source.width, source.height))
    side.paste(source, (0, 0))
    side.paste(result.image, (source.width, 0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    side.save(out)
    print(f"wrote {out}: '{DEMO_SOURCE}' -> '{DEMO_TARGET}' ({label}) in {result.timings.total_s:.1f}s (left: input, right: edit)")
    return 0
