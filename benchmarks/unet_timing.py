"""Child process for bench_cpu_knobs: time UNet forwards of one model under the environment it was started with."""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("golden", "sd15", "tiny"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    from benchmarks.models import EDITORS

    editor = EDITORS[args.model]()
    unet = editor.components.unet
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    latent = 8 if args.model == "tiny" else 32
    z = torch.randn(args.batch, 4, latent, latent)
    context = editor.embed("a photo").expand(args.batch, -1, -1)
    t = torch.tensor(500)
    with torch.no_grad():
        editor.runner.plain(z, t, context)  # warm-up, untimed
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            editor.runner.plain(z, t, context)
            times.append(time.perf_counter() - start)
    print(json.dumps({"mean_s": sum(times) / len(times), "min_s": min(times)}))


if __name__ == "__main__":
    main()
