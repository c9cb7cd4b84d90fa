"""Every Triton kernel launch the ops make, compiled for NVIDIA GPUs without one: registers, local
memory (spills) and shared memory per launch configuration.

The ops (``torch.ops.gnr_fast.*``) run here on CPU tensors of the shapes real models give them (SD 1.5's
head dims 40 / 80 / 160 and the bundled model's 8, long and short sequences, fp32 / fp16 / bf16) with
their kernel launches recorded instead of made; each distinct launch (kernel, argument types,
constexprs, warps) is then compiled by Triton for ``--arch`` (sm_90 = H100, sm_80 = A100) down to a
cubin, whose resource usage cuobjdump reads. A launch that would fail on the GPU — shared memory over
the architecture's per-block limit, or more registers than a block of its warps can get — fails here
first. This compiles the kernels; it does not run them (``benchmarks/gpu_check.sh`` does, on a GPU).

    python benchmarks/kernel_resources.py --arch 90 80 --json resources.json

Runs without ``TRITON_INTERPRET`` (the interpreter builds no GPU code).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Per-block shared memory a kernel may ask for (opt-in maximum) by compute capability, bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
               torch.int64: "i64"}
# (head dim, query tokens, key tokens): SD 1.5 at 512² (self-attention 4096 / 1024 / 256 / 64 tokens,
# cross-attention 77 keys), a short sequence below the block sizes, and the bundled model's head dim.
ATTENTION_SHAPES = [(40, 4096, 4096), (40, 4096, 77), (80, 1024, 1024), (160, 256, 256), (160, 64, 77), (8, 256, 256),
                    (8, 16, 16)]
FEATURE_SHAPES = [(1, 640, 32, 32), (2, 1280, 16, 16)]
# The modules that launch Triton kernels (through kernel_module).
OP_MODULES = ("gnr_fast.ops.attention_lse", "gnr_fast.ops.attn_map_energy.triton_path", "gnr_fast.ops.feature_energy",
              "gnr_fast.ops.rescale_norms")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the op would make it: the kernel, its typed signature, its constexprs
    and the compile options (warps, stages)."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, int], ...]
    fn: object = dataclasses.field(compare=False, repr=False)  # the @triton.jit kernel itself

    def describe(self) -> str:
        types = sorted({t for _, t in self.signature if t.startswith("*")})
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel}[{'/'.join(types)}; {consts}; {', '.join(f'{k}={v}' for k, v in self.options)}]"


def _arg_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a kernel argument of type {type(value).__name__}")


class _Recorder:
    """Stands for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, fn, launches: set[Launch]) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid) -> Callable[..., None]:
        def launch(*args, **kwargs) -> None:
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            bound = dict(zip(self.fn.arg_names, args)) | kwargs
            constexpr = {p.name for p in self.fn.params if p.is_constexpr}
            signature = tuple((name, "constexpr" if name in constexpr else _arg_type(bound[name]))
                              for name in self.fn.arg_names)
            constexprs = tuple((name, bound[name]) for name in self.fn.arg_names if name in constexpr)
            self.launches.add(Launch(self.fn.__name__, signature, constexprs, tuple(sorted(options.items())), self.fn))

        return launch


class _RecordingModule:
    """A kernel module whose kernels record their launches."""

    def __init__(self, module, launches: set[Launch]) -> None:
        self._module, self._launches = module, launches

    def __getattr__(self, name: str) -> _Recorder:
        return _Recorder(getattr(self._module, name), self._launches)


@contextlib.contextmanager
def recording() -> Iterator[set[Launch]]:
    """Within: every op that would launch a Triton kernel records the launch instead."""
    from gnr_fast.ops.triton_kernels import kernel_module

    launches: set[Launch] = set()

    def module(name: str) -> _RecordingModule:
        return _RecordingModule(kernel_module(name), launches)

    with contextlib.ExitStack() as stack:
        for owner in OP_MODULES:  # each imports kernel_module by name
            stack.enter_context(mock.patch.object(importlib.import_module(owner), "kernel_module", module))
        stack.enter_context(mock.patch.object(torch.library, "wrap_triton", lambda kernel: kernel))
        yield launches


def record_launches() -> list[Launch]:
    """The distinct launches of every Triton op over :data:`ATTENTION_SHAPES`, :data:`FEATURE_SHAPES`
    and the three dtypes, in a stable order."""
    for owner in OP_MODULES:
        importlib.import_module(owner)  # registers its ops
    ops = torch.ops.gnr_fast
    with recording() as launches:
        for dtype in DTYPES.values():
            for head_dim, tokens, keys in ATTENTION_SHAPES:
                q = torch.empty(1, 2, tokens, head_dim, dtype=dtype)
                k = torch.empty(1, 2, keys, head_dim, dtype=dtype)
                ops.attention_lse_fwd(q, k, k, 0.125)
                stats = torch.empty(1, 2, tokens)
                same = torch.empty(1, 2, tokens, head_dim, dtype=dtype)  # the energy compares self-attention
                ops.attn_map_energy_fwd(same, same, same, same, stats, 0.125)
                ops.attn_map_energy_bwd(same, same, same, same, stats, stats, stats, stats, 0.125)
            for shape in FEATURE_SHAPES:
                features = torch.empty(shape, dtype=dtype)
                for squared in (False, True):
                    ops.feature_energy_fwd(features, features, squared)
                latents = torch.empty(shape[0], 4, 64, 64, dtype=dtype)
                ops.rescale_gamma(latents, latents, 0.33, 3.0)
    return sorted(launches, key=Launch.describe)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED (static), LOCAL bytes of the one function in ``cubin`` (cuobjdump)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    usage = re.search(r"Function \S+:\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return dict(zip(("registers", "stack_bytes", "static_shared_bytes", "local_bytes"), map(int, usage.groups())))


def compile_launch(launch: Launch, arch: int) -> dict:
    """``launch`` compiled for sm_<arch>: its resources and whether a GPU of that architecture could
    launch it (``fits``, with ``why_not`` when it could not)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    source = ASTSource(fn=launch.fn, signature=dict(launch.signature),
                       constexprs=dict(launch.constexprs))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    usage = resource_usage(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    threads = compiled.metadata.num_warps * 32
    why_not = []
    if shared > SHARED_LIMIT[arch]:
        why_not.append(f"shared memory {shared} B > {SHARED_LIMIT[arch]} B per block")
    if usage["registers"] * threads > REGISTERS_PER_SM:
        why_not.append(f"{usage['registers']} registers × {threads} threads > {REGISTERS_PER_SM}")
    inputs = next(t for _, t in launch.signature if t.startswith("*"))[1:]
    return {"launch": launch.describe(), "kernel": launch.kernel, "inputs": inputs, "arch": arch, "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages, "shared_bytes": shared, **usage, "fits": not why_not,
            "why_not": "; ".join(why_not) or None, "compile_s": round(time.perf_counter() - start, 2)}


def check(archs: list[int]) -> list[dict]:
    """Every recorded launch compiled for every architecture in ``archs``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_resources.py: unset TRITON_INTERPRET (the interpreter builds no GPU code)")
    launches = record_launches()
    return [compile_launch(launch, arch) for arch in archs for launch in launches]


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (stack: the per-thread frame, where ptxas spills registers)."""
    lines = ["| sm | launch | registers | stack B/thread | shared B | fits |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['arch']} | `{r['launch']}` | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} | "
              f"{'yes' if r['fits'] else r['why_not']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = check(args.arch)
    import triton

    print(f"# Triton launches compiled for sm_{', sm_'.join(map(str, args.arch))} (triton {triton.__version__}, "
          f"torch {torch.__version__}; `python benchmarks/kernel_resources.py --arch {' '.join(map(str, args.arch))}`)\n")
    print(markdown(rows), end="")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
