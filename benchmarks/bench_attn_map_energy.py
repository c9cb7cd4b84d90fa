"""Benchmark: attention-map L2 energy, forward + backward, fast paths vs the materialised reference.

Sizes are self-attention layers at batch 1: SD 1.x (8 heads, head dim 40) at N = 1024 (32×32
latent tokens, 256² images) and N = 4096 (64×64, 512² images, DESIGN.md §8), plus a narrow
layer (4 heads, head dim 8) at N = 1024 like the small UNets of the CPU editing tests.

Implementations: ``ref`` (materialised maps), the chunked torch path with its two gradient
strategies — ``fused`` (gradient computed in the forward sweep, the default when autograd needs
it) and ``recompute`` (``recompute=True``: backward recomputes the maps) — ``native`` (the C++
CPU kernels of csrc/, fused gradient) and ``triton`` (CUDA).

``test_native_vs_torch`` times the native and the chunked torch path (both fused, the default
a guided step uses) side by side at the self-attention layer shapes of the bundled model (128²,
its own size, 256² and 512² images) and of SD 1.5 at 256² and 512²: ``--warmup`` calls each,
then max(``--rounds``, GNR_BENCH_ROUNDS) alternated rounds (benchmarks/alternating.py); the
table gives each median with its min–max and the ratio of the medians (target of issue 15:
≥ 2×), and each path's rate in G multiply-adds per second (:func:`multiply_adds` / median), to
hold against the core's peak. ``test_guided_step_native_vs_torch`` times one guided step of the bundled model with
either energy path. Run just those:

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_attn_map_energy.py -k "native_vs_torch" -s \
        --rounds 5 --warmup 1

(one core; with ``OMP_NUM_THREADS=N`` both paths run on N threads, the native loops through
``at::parallel_for`` — ``gnr-fast doctor`` shows how many threads they get).

``test_fast_paths_vs_reference`` alternates the materialised reference and the chunked torch
path (fused and recomputing gradients) at ``SIZES`` the same way (the README's table):

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_attn_map_energy.py -k "fast_paths" -s --rounds 3 --warmup 1

``test_attn_map_energy_forward_backward`` keeps one pytest-benchmark group per size (each
implementation timed on its own, for ``--benchmark-compare`` across versions) and peak memory.

Reported side by side in one run (STYLE.md rule 12):
- time: pytest-benchmark's table, one group per size; the parenthesised numbers are ratios to
  the fastest row of the group. Summary lines give each fast path / ref and fused / recompute.
- peak memory of one forward + backward above the inputs: on CPU the growth of the peak resident
  set size (VmHWM) in a fresh child process per measurement (no tracemalloc, no allocator
  hooks; a child so earlier runs do not hide it); on CUDA ``torch.cuda.max_memory_allocated``.

Run:  python -m pytest benchmarks/bench_attn_map_energy.py   (not part of CI; ~2 min on 2 cores;
      prefix OMP_NUM_THREADS=1 to time one core)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gnr_fast.ops.attention_lse import attention_lse
from gnr_fast.ops.attn_map_energy import (
    attn_map_energy,
    attn_map_energy_ref,
    triton_supported,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES: dict[str, tuple[int, int, int, int]] = {  # name: (B, H, N, D)
    "N1024-H4-D8": (1, 4, 1024, 8),
    "N1024-H8-D40": (1, 8, 1024, 40),
    "N4096-H8-D40": (1, 8, 4096, 40),
}
IMPLS: dict[str, tuple[Callable[..., torch.Tensor], dict[str, object]]] = {
    "ref": (attn_map_energy_ref, {}),
    "fused": (attn_map_energy, {"backend": "torch", "recompute": False}),
    "recompute": (attn_map_energy, {"backend": "torch", "recompute": True}),
    "native": (attn_map_energy, {"backend": "native"}),
    "triton": (attn_map_energy, {"backend": "triton"}),
}

# Self-attention layers (B=1) per model and image size: the bundled shapes-v1 UNet (4 heads,
# block_out_channels 32/64/64 → head dims 8/16/16, attention at latent/1, /2, /4) and SD 1.5
# (8 heads, 320/640/1280 channels → head dims 40/80/160, plus the mid block at latent/8).
LAYER_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "bundled-128-N256-D8": (1, 4, 256, 8),  # the bundled model's own image size (16² latents)
    "bundled-128-N64-D16": (1, 4, 64, 16),
    "bundled-128-N16-D16": (1, 4, 16, 16),
    "bundled-256-N1024-D8": (1, 4, 1024, 8),
    "bundled-256-N256-D16": (1, 4, 256, 16),
    "bundled-256-N64-D16": (1, 4, 64, 16),
    "bundled-512-N4096-D8": (1, 4, 4096, 8),
    "bundled-512-N1024-D16": (1, 4, 1024, 16),
    "bundled-512-N256-D16": (1, 4, 256, 16),
    "sd15-256-N1024-D40": (1, 8, 1024, 40),
    "sd15-256-N256-D80": (1, 8, 256, 80),
    "sd15-256-N64-D160": (1, 8, 64, 160),
    "sd15-512-N4096-D40": (1, 8, 4096, 40),
    "sd15-512-N1024-D80": (1, 8, 1024, 80),
    "sd15-512-N256-D160": (1, 8, 256, 160),
    "sd15-512-N64-D160": (1, 8, 64, 160),
}
ROUNDS = int(os.environ.get("GNR_BENCH_ROUNDS", "3"))
# Pointing the native library variable at a missing file makes native_unsupported_reason() name
# it, so the energy takes the chunked torch path (the library stays loaded; nothing is patched).
NATIVE_OFF = "/nonexistent/native-off-for-this-benchmark.so"


def make_inputs(batch: int, heads: int, tokens: int, head_dim: int, device: str = DEVICE) -> tuple[torch.Tensor, ...]:
    """(q, k, q_ref, k_ref, lse_ref): a source pass and a perturbed current pass, float32."""
    gen = torch.Generator().manual_seed(0)
    shape = (batch, heads, tokens, head_dim)
    q_ref, k_ref = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)  # [B, H, N, D]
    q = q_ref + 0.3 * torch.randn(shape, generator=gen)
    k = k_ref + 0.3 * torch.randn(shape, generator=gen)
    q, k, q_ref, k_ref = (t.to(device) for t in (q, k, q_ref, k_ref))
    return q.requires_grad_(), k.requires_grad_(), q_ref, k_ref, attention_lse(q_ref, k_ref)


def forward_backward(impl: str, inputs: tuple[torch.Tensor, ...]) -> None:
    """One energy evaluation and its q/k gradients with implementation ``impl``."""
    fn, kwargs = IMPLS[impl]
    energy = fn(*inputs, **kwargs)
    torch.autograd.grad(energy, inputs[:2])
    if inputs[0].is_cuda:
        torch.cuda.synchronize()


def peak_memory_mib(impl: str, size: str) -> float:
    """Peak memory (MiB) of one forward + backward above the inputs (see the module docstring)."""
    if DEVICE == "cuda":
        inputs = make_inputs(*SIZES[size])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(impl, inputs)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run(
        [sys.executable, __file__, "--peak-rss", impl, size],
        capture_output=True, text=True, check=True, cwd=repo, env=env,
    )
    return float(child.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest) -> Iterator[dict[str, dict[str, tuple[float, float]]]]:
    """Collects (mean seconds, peak MiB) per size and implementation; prints the ratios at the end."""
    table: dict[str, dict[str, tuple[float, float]]] = {size: {} for size in SIZES}
    yield table
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # print past pytest's output capture
        reporter.write_line("")
        _report_ratios(table, reporter.write_line)


def _report_ratios(table: dict[str, dict[str, tuple[float, float]]], write_line: Callable[[str], None]) -> None:
    """Per size: time and peak-memory ratios of each fast implementation to the reference, and of
    the fused to the recomputing gradient."""
    for size, rows in table.items():
        pairs = [(impl, "ref") for impl in rows if impl != "ref"] + [("fused", "recompute")]
        for impl, base in pairs:
            if impl not in rows or base not in rows:
                continue
            (seconds, peak), (base_seconds, base_peak) = rows[impl], rows[base]
            write_line(
                f"attn_map_energy {size} on {DEVICE}: {impl}/{base} time {seconds / base_seconds:.2f}x "
                f"({seconds:.3f}s vs {base_seconds:.3f}s), peak memory {peak / base_peak:.3f}x "
                f"({peak:.0f} MiB vs {base_peak:.0f} MiB)"
            )


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("size", list(SIZES))
def test_attn_map_energy_forward_backward(benchmark, results, size: str, impl: str) -> None:
    inputs = make_inputs(*SIZES[size])
    if impl == "triton" and not triton_supported(inputs[0]):
        pytest.skip("the Triton kernels need a CUDA GPU and triton")
    benchmark.group = f"attn_map_energy fwd+bwd {size} {DEVICE}"
    # CPU at N = 4096 takes ~10 s per call: one untimed warm-up is not worth it there.
    rounds, warmup = (5, 1) if SIZES[size][2] <= 1024 or DEVICE == "cuda" else (1, 0)
    benchmark.pedantic(forward_backward, args=(impl, inputs), rounds=rounds, iterations=1, warmup_rounds=warmup)
    peak = peak_memory_mib(impl, size)
    benchmark.extra_info["peak_mib"] = peak
    if benchmark.stats is not None:
        results[size][impl] = (benchmark.stats.stats.mean, peak)


@pytest.mark.parametrize("size", list(SIZES))
def test_fast_paths_vs_reference(record, rounds, warmup, size: str) -> None:
    """Alternated rounds (``--warmup`` untimed calls each, then ``--rounds`` rounds in the order
    ref fused recompute, recompute fused ref, …) of the materialised reference and the chunked torch
    path's two gradient strategies, fwd+bwd; two rows per size (fused / ref and recompute / ref)."""
    from benchmarks.alternating import alternate

    inputs = make_inputs(*SIZES[size])
    impls = ("ref", "fused", "recompute")
    samples = alternate({impl: (lambda i=impl: forward_backward(i, inputs)) for impl in impls}, rounds, warmup)
    for impl in impls[1:]:
        case = f"attn_map_energy {size} on {DEVICE}: ref vs {impl}"
        record(case, "reference", samples=samples["ref"])
        record(case, "fast", samples=samples[impl], threads=torch.get_num_threads())


@pytest.mark.parametrize("layer", list(LAYER_SHAPES))
def test_native_vs_torch(record, rounds, warmup, layer: str) -> None:
    """Alternated rounds (``--warmup`` untimed calls each, then ``--rounds`` rounds in the order
    torch native, native torch, …; benchmarks/alternating.py) of the chunked torch path and the
    native kernels, both fused fwd+bwd."""
    from benchmarks.alternating import alternate
    from gnr_fast.ops.attn_map_energy import native_supported, native_unsupported_reason

    inputs = make_inputs(*LAYER_SHAPES[layer], device="cpu")
    if not native_supported(inputs[0]):
        pytest.skip(f"native ops unavailable: {native_unsupported_reason(inputs[0])}")
    samples = alternate({impl: (lambda i=impl: forward_backward(i, inputs)) for impl in ("fused", "native")},
                        max(rounds, ROUNDS), warmup)
    fmas = multiply_adds(*LAYER_SHAPES[layer])
    record(f"attn_map_energy {layer}", "reference", samples=samples["fused"],
           torch_gfma_s=round(fmas / samples["fused"].median / 1e9, 1))
    record(f"attn_map_energy {layer}", "fast", samples=samples["native"], threads=torch.get_num_threads(),
           native_gfma_s=round(fmas / samples["native"].median / 1e9, 1))


def multiply_adds(batch: int, heads: int, tokens: int, head_dim: int) -> int:
    """Multiply-adds of one fused forward + backward, 4·B·H·N²·D: the two score products (q kᵀ and
    q_ref k_refᵀ), dq = P k and dk = Pᵀ q. Both paths perform exactly these; divided by a time it is
    the rate to hold against the CPU's peak (one AVX2 core: 16 per cycle, two 8-lane FMA pipes)."""
    return 4 * batch * heads * tokens * tokens * head_dim


@contextmanager
def _native_lib(path: str | None) -> Iterator[None]:
    """``GNR_FAST_NATIVE_LIB`` set to ``path`` (None: left as it is) for the block."""
    from gnr_fast.ops.native import LIBRARY_ENV

    before = os.environ.get(LIBRARY_ENV)
    if path is not None:
        os.environ[LIBRARY_ENV] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LIBRARY_ENV, None)
        else:
            os.environ[LIBRARY_ENV] = before


def test_guided_step_native_vs_torch(record, rounds, warmup) -> None:
    """One guided step of the bundled model (128² image, non-stylisation preset, step 5 of 50) with
    the attention-map energy on the native kernels vs the chunked torch path, alternated rounds
    (``--rounds``/``--warmup``); everything else in the step is the same code. The saving per
    step is the difference of the medians."""
    from PIL import Image

    from benchmarks.alternating import alternate
    from gnr_fast import Editor
    from gnr_fast.config import EditConfig
    from gnr_fast.editing import EditContext
    from gnr_fast.fast.step import fast_step
    from gnr_fast.loading import BUNDLED_MODEL
    from gnr_fast.ops.attn_map_energy import native_unsupported_reason

    if not (BUNDLED_MODEL / "model_index.json").is_file():
        pytest.skip(f"bundled model absent at {BUNDLED_MODEL}")
    reason = native_unsupported_reason(torch.empty(1, 1, 1, 8))
    if reason is not None:
        pytest.skip(f"native ops unavailable: {reason}")
    steps, step, size = 50, 5, 128
    editor = Editor.from_pretrained(BUNDLED_MODEL)
    image = Image.new("RGB", (size, size), (40, 60, 200))
    image.paste((220, 30, 30), (size // 4, size // 4, size // 2, size // 2))
    inversion = editor.invert(image, "a red square on a blue background", num_steps=steps, progress=False)
    config = EditConfig.nonstyle(steps)
    ctx = EditContext.build(editor.components, editor.runner, config, editor.self_attn_layers, editor.embed(""),
                            editor.embed(inversion.source_prompt), editor.embed("a green square on a blue background"))
    z_star = inversion.latents[steps - step]
    z = z_star + 0.05 * torch.randn(z_star.shape, generator=torch.Generator().manual_seed(step))

    def run(lib: str | None) -> Callable[[], object]:
        def guided() -> object:
            with _native_lib(lib):
                return fast_step(ctx, z, z_star, step)
        return guided

    with _native_lib(NATIVE_OFF):
        assert native_unsupported_reason(z) is not None  # the torch variant really is the torch path
    samples = alternate({"torch": run(NATIVE_OFF), "native": run(None)}, rounds, warmup)
    saving = samples["torch"].median - samples["native"].median
    case = f"bundled {size}²: one guided step, attention-map energy torch vs native"
    record(case, "reference", samples=samples["torch"])
    record(case, "fast", samples=samples["native"], saving_s_per_step=round(saving, 4),
           threads=torch.get_num_threads())


def _peak_rss_kib() -> int:
    """This process's peak resident set size (VmHWM, KiB). Read from /proc rather than
    ``getrusage``, whose ru_maxrss a child inherits from its parent across fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line (the CPU memory benchmark needs Linux)")


def _print_peak_rss(impl: str, size: str) -> None:
    """Child-process entry: print the growth of the peak RSS (MiB) over one forward + backward."""
    inputs = make_inputs(*SIZES[size], device="cpu")
    before = _peak_rss_kib()
    forward_backward(impl, inputs)
    sys.stdout.write(f"{(_peak_rss_kib() - before) / 1024:.1f}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peak-rss", nargs=2, metavar=("IMPL", "SIZE"), required=True)
    impl_name, size_name = parser.parse_args().peak_rss
    _print_peak_rss(impl_name, size_name)
