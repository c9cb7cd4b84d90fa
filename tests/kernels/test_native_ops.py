"""Tests of the C++ CPU ops (csrc/, ``gnr_fast.ops.native``) against the materialised references.

The library is built by the install command (``pip install -e ".[test]"``); where it is absent
these tests skip with the reason, except that ``GNR_FAST_REQUIRE_NATIVE=1`` (set by ``.ci/run``)
turns its absence into a failure, so CI proves the build.

Tolerances: the kernels compute in float32 with their own exponentials (the energy: a degree-5
2^x polynomial; lse: a Cephes exp; both ~2 ulp) and block-wise sums; measured worst relative
errors over this file's shapes against the float32 reference are 1.1e-6 (dq), 8.2e-7 (dk), 2.1e-7
(energy) with the AVX2 build (2026-12-03; the AVX-512 build with the earlier exp: 1.3e-6, 1.0e-6,
8e-8) and 1e-6 (lse, absolute) — bound 1e-5. The shapes' N (16 … 256) give full and partial last
key blocks in either position of a 2-block register tile. Halves follow the FlashAttention rule
as in test_attn_map_energy.py.
"""

from __future__ import annotations

import importlib
import logging
import os

import pytest
import torch

from gnr_fast.errors import BackendUnavailableError
from gnr_fast.ops import native
from gnr_fast.ops.attention_lse import attention_lse
from gnr_fast.ops.attn_map_energy import (
    attn_map_energy,
    attn_map_energy_ref,
    native_supported,
)
from gnr_fast.ops.path_choice import forget_logged_choices
from gnr_fast.precision import cpu_flags
from kernel_error import rel_err

ops = importlib.import_module("gnr_fast.ops.attn_map_energy")

REASON = native.native_unavailable_reason()
if REASON is not None and os.environ.get("GNR_FAST_REQUIRE_NATIVE") == "1":
    raise RuntimeError(f"GNR_FAST_REQUIRE_NATIVE=1 but the native ops are unavailable: {REASON}")
needs_native = pytest.mark.skipif(REASON is not None, reason=f"native ops unavailable: {REASON}")

FP32_RTOL = 1e-5


def make_inputs(batch, heads, tokens, head_dim, dtype=torch.float32, seed=0):
    """(q, k, q_ref, k_ref, lse_ref): a source pass and a perturbed current pass."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, tokens, head_dim)
    q_ref, k_ref = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = q_ref + 0.3 * torch.randn(shape, generator=gen)
    k = k_ref + 0.3 * torch.randn(shape, generator=gen)
    q, k, q_ref, k_ref = (t.to(dtype) for t in (q, k, q_ref, k_ref))
    lse_ref = torch.logsumexp(q_ref.double() @ k_ref.double().transpose(-1, -2) * head_dim**-0.5, -1).float()
    return q.requires_grad_(), k.requires_grad_(), q_ref, k_ref, lse_ref


# The self-attention scale of the non-stylisation preset (DESIGN.md §6): the upstream gradient
# the energy really receives.
UPSTREAM = 3e5


def energy_and_grads(fn, q, k, q_ref, k_ref, lse_ref, **kwargs):
    energy = fn(q, k, q_ref, k_ref, lse_ref, **kwargs)
    dq, dk = torch.autograd.grad(energy, (q, k), grad_outputs=torch.full_like(energy, UPSTREAM))
    return energy.detach(), dq, dk


@needs_native
@pytest.mark.parametrize("recompute", [False, True], ids=["fused", "recompute"])
@pytest.mark.parametrize("chunk", [7, 16, None], ids=["rows7", "rows16", "rows_default"])
@pytest.mark.parametrize("shape", [(1, 1, 16, 4), (2, 3, 50, 8), (1, 4, 256, 16), (1, 2, 100, 40), (2, 1, 33, 80), (1, 2, 60, 24)])
def test_native_matches_reference_fp32(shape, chunk, recompute):
    """Energy, dq, dk of the C++ path vs the fp32 reference (row blocks 7 and 16 divide none /
    some of the N)."""
    inputs = make_inputs(*shape)
    expected = energy_and_grads(attn_map_energy_ref, *inputs)
    actual = energy_and_grads(attn_map_energy, *inputs, backend="native", chunk=chunk, recompute=recompute)
    for name, a, e in zip(("energy", "dq", "dk"), actual, expected):
        assert a.dtype == e.dtype
        assert rel_err(a, e) <= FP32_RTOL, f"{name}: {rel_err(a, e):.2e}"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_half_inputs_flash_attention_rule(dtype):
    """Half inputs: error vs float64 at most 2× the reference's own on the same half inputs;
    gradients come back in the input dtype. The upstream gradient here is the preset's 3e5 times
    2**12 for float16 (a loss scale: 3e5 alone underflows float16 gradients, see
    test_attn_map_energy.py's fp16 test) and 3e5 for bfloat16."""
    q, k, q_ref, k_ref, lse_ref = make_inputs(2, 2, 64, 40, dtype=dtype)
    upstream = UPSTREAM * (2**12 if dtype == torch.float16 else 1)

    def run(fn, q, k, q_ref, k_ref, lse, **kw):
        energy = fn(q, k, q_ref, k_ref, lse, **kw)
        return (energy.detach(), *torch.autograd.grad(energy, (q, k), torch.full_like(energy, upstream)))

    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    lse64 = torch.logsumexp(q_ref.double() @ k_ref.double().transpose(-1, -2) * 40**-0.5, -1)
    exact = run(attn_map_energy_ref, q64, k64, q_ref.double(), k_ref.double(), lse64)
    baseline = run(attn_map_energy_ref, q, k, q_ref, k_ref, lse_ref)
    actual = run(attn_map_energy, q, k, q_ref, k_ref, lse_ref, backend="native", chunk=13)
    assert actual[1].dtype == dtype and actual[2].dtype == dtype
    for name, a, b, e in zip(("energy", "dq", "dk"), actual, baseline, exact):
        assert rel_err(a, e) <= 2 * rel_err(b, e) + 1e-5, f"{name}: {rel_err(a, e):.2e}"


@needs_native
@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_native_gradcheck_float32():
    """Finite differences (float32, so a coarse eps) agree with the native backward."""
    q, k, q_ref, k_ref, lse_ref = make_inputs(1, 2, 6, 3, seed=2)

    def energy(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return attn_map_energy(q, k, q_ref, k_ref, lse_ref, backend="native", chunk=4) * 1e3

    assert torch.autograd.gradcheck(energy, (q, k), eps=1e-2, atol=5e-3, rtol=5e-2)


@needs_native
def test_native_fused_and_recompute_agree():
    inputs = make_inputs(2, 3, 45, 8, seed=7)
    fused = energy_and_grads(attn_map_energy, *inputs, backend="native", chunk=10, recompute=False)
    again = energy_and_grads(attn_map_energy, *inputs, backend="native", chunk=10, recompute=True)
    for a, b in zip(fused, again):
        assert rel_err(a, b) <= 1e-6


@needs_native
@pytest.mark.parametrize("rows", [0, 5])
@pytest.mark.parametrize("keys", [50, 23])
def test_native_attention_lse(rows, keys):
    """Per-row lse equals torch.logsumexp (also for N_q ≠ N_k); the public attention_lse uses it."""
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 50, 8, generator=gen), torch.randn(2, 3, keys, 8, generator=gen)
    expected = torch.logsumexp(0.7 * q @ k.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(native.attention_lse(q, k, 0.7, rows), expected, rtol=1e-5, atol=1e-5)
    assert native_supported(q)
    torch.testing.assert_close(attention_lse(q, k, scale=0.7), expected, rtol=1e-5, atol=1e-5)


@needs_native
def test_native_ops_pass_opcheck():
    """Schema, fake kernels and dispatch of all three registered ops."""
    q, k, q_ref, k_ref, lse_ref = (t.detach() for t in make_inputs(1, 2, 20, 8))
    args = (q, k, q_ref, k_ref, lse_ref, 0.3)
    _, row_dot, _, _ = native.attn_map_energy_fwd(*args, False, 0)
    torch.library.opcheck(torch.ops.gnr_fast_native.attn_map_energy_fwd.default, (*args, True, 7))
    torch.library.opcheck(torch.ops.gnr_fast_native.attn_map_energy_fwd.default, (*args, False, 0))
    torch.library.opcheck(
        torch.ops.gnr_fast_native.attn_map_energy_bwd.default, (q, k, q_ref, k_ref, lse_ref, row_dot, 0.3, 6)
    )
    torch.library.opcheck(torch.ops.gnr_fast_native.attention_lse.default, (q, k[:, :, :13], 0.3, 4))


@needs_native
def test_tile_geometry_follows_the_cpu():
    """The install command builds with -march=native, so the energy kernels' vectors must be one
    register of this CPU: 16 lanes with AVX-512, 8 without. A fixed 16-lane geometry built for an
    AVX2 CPU spilled its register tiles and ran 3-7x slower than the torch path it replaces."""
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here to tell the CPU's vector width")
    assert native.vector_lanes() == (16 if "avx512f" in flags else 8)


@needs_native
def test_native_loops_run_on_torchs_threads(restore_torch_threads):
    """The kernels' at::parallel_for loops are compiled into the library; built without OpenMP they
    ran on one thread whatever torch.set_num_threads said (every build before 2026-12-07)."""
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        assert native.parallel_threads(64) == threads
    assert native.parallel_threads(2) == 2  # never more threads than items


@needs_native
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("shape", [(1, 1, 100, 40), (1, 2, 256, 16), (2, 3, 50, 8)], ids=["bh1", "bh2", "bh6"])
def test_native_threaded_split_matches_reference(restore_torch_threads, threads, shape):
    """On several threads the kernel splits work by (batch·head, row group); with fewer batch·heads
    than threads each head's rows are split into groups whose dk partial sums are reduced after. Each
    split must give the reference's energy and gradients, like the one-thread sweep."""
    torch.set_num_threads(threads)
    inputs = make_inputs(*shape, seed=3)
    actual = energy_and_grads(attn_map_energy, *inputs, backend="native")
    expected = energy_and_grads(attn_map_energy_ref, *inputs)
    for name, a, e in zip(("energy", "dq", "dk"), actual, expected):
        assert rel_err(a, e) < FP32_RTOL, f"{name}: {rel_err(a, e):.2e}"
    _, dq, dk = actual
    torch.set_num_threads(1)
    _, dq_one, dk_one = energy_and_grads(attn_map_energy, *inputs, backend="native")
    torch.testing.assert_close(dq, dq_one, rtol=FP32_RTOL, atol=FP32_RTOL * dq_one.abs().max().item())
    torch.testing.assert_close(dk, dk_one, rtol=FP32_RTOL, atol=FP32_RTOL * dk_one.abs().max().item())


@needs_native
def test_library_lacking_an_op_is_named():
    """A library built from older sources than this module lacks ops; the loader names them."""
    assert native.missing_ops(native.REQUIRED_OPS) == []
    assert native.missing_ops(("vector_lanes", "no_such_op")) == ["no_such_op"]


@needs_native
def test_auto_uses_native_on_cpu_and_logs_once(caplog, monkeypatch):
    forget_logged_choices()
    inputs = make_inputs(1, 1, 16, 4)
    with caplog.at_level(logging.INFO, logger=ops.__name__):
        expected = attn_map_energy(*inputs, backend="native")
        assert torch.equal(attn_map_energy(*inputs), expected)
        attn_map_energy(*inputs)
    messages = [r.getMessage() for r in caplog.records if r.name == ops.__name__ and "native path" in r.getMessage()]
    assert len(messages) == 2, messages  # one for the forced, one for the automatic choice


def test_missing_library_gives_reason_and_torch_path(caplog, monkeypatch, tmp_path):
    """A missing library: the reason names the path and the build command; ``auto`` takes the
    torch path and says why once; ``native`` raises BackendUnavailableError."""
    monkeypatch.setenv(native.LIBRARY_ENV, str(tmp_path / "nothing.so"))
    forget_logged_choices()
    reason = native.native_unavailable_reason()
    assert reason is not None and "nothing.so" in reason and "pip install -e ." in reason
    inputs = make_inputs(1, 1, 16, 4)
    with caplog.at_level(logging.INFO, logger=ops.__name__):
        attn_map_energy(*inputs)
        attn_map_energy(*inputs)
    messages = [r.getMessage() for r in caplog.records if r.name == ops.__name__]
    assert len(messages) == 1 and "torch path" in messages[0] and "not built" in messages[0], messages
    with pytest.raises(BackendUnavailableError, match="backend='native' is unavailable"):
        attn_map_energy(*inputs, backend="native")


def test_library_for_another_torch_is_refused(monkeypatch, tmp_path):
    """A library stamped with another torch version is not loaded (C++ ops are ABI-bound)."""
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"not a library")
    (tmp_path / "lib.so.torch-version").write_text("1.0.0")
    monkeypatch.setenv(native.LIBRARY_ENV, str(lib))
    reason = native.native_unavailable_reason()
    assert reason is not None and "built for torch 1.0.0" in reason and torch.__version__ in reason
