"""The ``gnr-fast`` command line: ``edit``, ``invert`` (and the subcommands later issues add)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .errors import GnrError

logger = logging.getLogger("gnr_fast.cli")

DTYPES = ("float32", "float16", "bfloat16")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local diffusers SD 1.x/2.x folder (default: the bundled model)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default: float32)")
    parser.add_argument("--max-pixels", type=int, default=None, help="largest accepted width×height (default 1048576)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gnr-fast", description="Guide-and-Rescale real-image editing")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit an image toward a target prompt")
    edit.add_argument("image", nargs="?", help="input image (PNG/JPEG/WebP); omit when --inversion is given")
    edit.add_argument("-s", "--source", help="prompt describing the input image")
    edit.add_argument("-t", "--target", required=True, help="prompt describing the edited image")
    edit.add_argument("-o", "--out", default=None, help="output image path (default: <image>_edited.png)")
    edit.add_argument("--preset", default="nonstyle", choices=("nonstyle", "style"), help="guidance preset")
    edit.add_argument("--config", default=None, help="edit config in the authors' YAML format (overrides --preset)")
    edit.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50, or the inversion's)")
    edit.add_argument("--inversion", default=None, help="reuse an inversion file written by `gnr-fast invert`")
    edit.add_argument("--mode", default=None, help="execution mode (default: the library's default)")
    _add_model_args(edit)

    inv = sub.add_parser("invert", help="DDIM-invert an image once, for repeated edits")
    inv.add_argument("image", help="input image (PNG/JPEG/WebP)")
    inv.add_argument("-s", "--source", required=True, help="prompt describing the input image")
    inv.add_argument("-o", "--out", required=True, help="output inversion file (e.g. photo.inv)")
    inv.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    _add_model_args(inv)
    return parser


def _quiet_library_progress() -> None:
    """The CLI shows its own progress; silence the per-tensor loading bars of transformers/diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _editor(args: argparse.Namespace):
    import torch

    from .editor import Editor
    from .images import DEFAULT_MAX_PIXELS

    return Editor.from_pretrained(
        args.model,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
    )


def _check_before_loading(args: argparse.Namespace) -> None:
    """Fail fast on user mistakes the model is not needed for (missing files, empty prompts)."""
    from .errors import InputError
    from .prompts import check_prompt

    for name in ("image", "inversion", "config"):
        value = getattr(args, name, None)
        if value is not None and not Path(value).is_file():
            raise InputError(f"{name} file {value!r} does not exist")
    if getattr(args, "target", None) is not None:
        check_prompt(args.target, "target_prompt")
    if args.source is not None:
        check_prompt(args.source, "source_prompt")


def _cmd_edit(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .inversion import Inversion

    if args.inversion is None and args.image is None:
        raise InputError("give an IMAGE to edit, or --inversion FILE from `gnr-fast invert`")
    if args.inversion is None and not args.source:
        raise InputError("-s/--source (a prompt describing the input image) is required when editing an image")
    _check_before_loading(args)
    editor = _editor(args)
    source = Inversion.load(args.inversion, device=args.device) if args.inversion else args.image
    kwargs = {"mode": args.mode} if args.mode else {}
    result = editor.edit(
        source,
        args.target,
        source_prompt=args.source,
        preset=args.preset,
        config=args.config,
        num_steps=args.steps,
        progress=not args.quiet,
        **kwargs,
    )
    if args.out is not None:
        out = Path(args.out)
    elif args.image is not None:
        out = Path(args.image).with_name(Path(args.image).stem + "_edited.png")
    else:
        out = Path(args.inversion).with_suffix(".edited.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    t = result.timings
    print(
        f"wrote {out} ({result.image.width}x{result.image.height}) in {t.total_s:.1f}s "
        f"[inversion {t.inversion_s:.1f}s, editing {t.editing_s:.1f}s, decoding {t.decoding_s:.1f}s, "
        f"{result.unet_calls} UNet calls]"
    )
    return 0


def _cmd_invert(args: argparse.Namespace) -> int:
    import time

    _check_before_loading(args)
    editor = _editor(args)
    start = time.perf_counter()
    inversion = editor.invert(args.image, args.source, num_steps=args.steps, progress=not args.quiet)
    path = inversion.save(args.out)
    print(f"wrote {path} ({inversion.num_steps} steps, model {inversion.model_id}) in {time.perf_counter() - start:.1f}s")
    return 0


COMMANDS = {"edit": _cmd_edit, "invert": _cmd_invert}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gnr-fast`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        _quiet_library_progress()
        return COMMANDS[args.command](args)
    except GnrError as exc:
        print(f"gnr-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gnr-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
