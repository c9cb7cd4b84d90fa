"""The first step of ``benchmarks/gpu_check.sh``: what runs the check (Python, torch, CUDA, Triton,
numpy, diffusers, transformers, where gnr_fast is imported from, the GPU), printed and written to
``--out`` as ``name: value`` lines; exits 1 when torch sees no CUDA device, so that the run's
status says at once that the later steps could not use a GPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def versions() -> dict[str, str]:
    """``name -> value`` of everything the check's results depend on (imports each package)."""
    import diffusers
    import numpy
    import torch
    import transformers
    import triton

    import gnr_fast

    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda),
        "triton": triton.__version__, "numpy": numpy.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "gnr_fast": str(Path(gnr_fast.__file__).parent),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (torch sees no CUDA GPU)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="file for the name: value lines")
    args = parser.parse_args()
    import torch

    text = "".join(f"{name}: {value}\n" for name, value in versions().items())
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0 if torch.cuda.is_available() else 1


if __name__ == "__main__":
    sys.exit(main())
