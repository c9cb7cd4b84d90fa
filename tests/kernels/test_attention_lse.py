"""Tests of ``gnr_fast.ops.attention_lse.attention_with_lse`` against its materialised reference.

Every path (CPU flash, SDPA + chunked lse, Triton under the interpreter; xformers only on CUDA
with xformers) is compared with :func:`attention_with_lse_ref` for the output, the lse, and the
q/k/v gradients of a loss that uses both (so the lse's own gradient is checked).

Tolerances: float32 — normwise relative error 1e-5 (measured ≤ 1e-6 over these shapes); halves —
the FlashAttention rule against float64 (at most 2× the reference's own error on the same half
inputs, plus 1e-3 for the half rounding of intermediates inside the fused kernels; the lse, a
float32 output, plus FP32_RTOL). Measured on the half-input case (1 thread, 2026-12-07), worst over
paths: fp16 out/dq/dk/dv 3.7e-4/6.5e-4/8.2e-4/5.7e-4 against bounds 1.5e-3 to 1.8e-3; bf16
2.8e-3/4.6e-3/5.1e-3/3.4e-3 against 5.2e-3 to 8.2e-3; lse 4.0e-6 (cpu_flash; 8e-8 elsewhere)
against 1.0e-5 (with the 1e-3 floor it had a 250x margin).
"""

from __future__ import annotations

import pytest
import torch

from gnr_fast.errors import BackendUnavailableError, InputError
from gnr_fast.ops.attention_lse import (
    attention_lse_path,
    attention_with_lse,
    attention_with_lse_ref,
    path_unavailable_reason,
)
from kernel_error import rel_err

FP32_RTOL = 1e-5
HALF_FLOOR = 1e-3


def make_qkv(batch, heads, tokens, keys, head_dim, value_dim=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, head_dim, generator=gen)
    k = torch.randn(batch, heads, keys, head_dim, generator=gen)
    v = torch.randn(batch, heads, keys, value_dim or head_dim, generator=gen)
    return tuple(t.to(dtype).requires_grad_() for t in (q, k, v))


def outputs_and_grads(fn, q, k, v, **kwargs):
    """(out, lse, dq, dk, dv) for the loss Σ out·g_out + Σ lse·g_lse with fixed random g's."""
    out, lse = fn(q, k, v, **kwargs)
    gen = torch.Generator().manual_seed(99)
    g_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    g_lse = torch.randn(lse.shape, generator=gen).to(lse.dtype)
    loss = (out.float() * g_out.float()).sum() + (lse.float() * g_lse.float()).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


NAMES = ("out", "lse", "dq", "dk", "dv")


def _skip_unavailable(path, q, k, v):
    reason = path_unavailable_reason(path, q, k, v)
    if reason is not None:
        pytest.skip(f"{path}: {reason}")


SHAPES = [  # (B, H, N, L, D, DV): SD head dims; token counts not multiples of the blocks
    (1, 2, 50, 50, 40, 40),
    (2, 1, 37, 37, 64, 64),
    (1, 2, 33, 20, 80, 80),
    (1, 1, 24, 24, 160, 160),
    (1, 2, 19, 30, 8, 16),
]


@pytest.mark.parametrize("path, shape", [
    pytest.param(path, shape, id=f"{'x'.join(map(str, shape))}-{path}")
    for shape in SHAPES for path in ("cpu_flash", "sdpa", "triton")
    if not (path == "cpu_flash" and shape[4] != shape[5])  # needs one head dim (test_auto_dispatch_on_cpu)
])
def test_paths_match_reference_fp32(path, shape):
    q, k, v = make_qkv(*shape)
    _skip_unavailable(path, q, k, v)
    expected = outputs_and_grads(attention_with_lse_ref, q, k, v)
    actual = outputs_and_grads(attention_with_lse, q, k, v, backend=path)
    assert actual[1].dtype == torch.float32 and actual[1].shape == q.shape[:3]
    for name, a, e in zip(NAMES, actual, expected):
        assert rel_err(a, e) <= FP32_RTOL, f"{name}: {rel_err(a, e):.2e}"


@pytest.mark.parametrize("path", ["cpu_flash", "sdpa", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paths_half_inputs(path, dtype):
    q, k, v = make_qkv(1, 2, 45, 45, 40, dtype=dtype, seed=3)
    if path == "triton" and dtype == torch.bfloat16 and not q.is_cuda:
        pytest.skip("bfloat16 tl.dot needs a CUDA GPU (the Triton interpreter lacks it: triton-lang/triton#11584)")
    _skip_unavailable(path, q, k, v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = outputs_and_grads(attention_with_lse_ref, q64, k64, v64)
    baseline = outputs_and_grads(attention_with_lse_ref, q, k, v)
    actual = outputs_and_grads(attention_with_lse, q, k, v, backend=path)
    assert actual[0].dtype == dtype and actual[1].dtype == torch.float32
    for name, a, b, e in zip(NAMES, actual, baseline, exact):
        floor = FP32_RTOL if name == "lse" else HALF_FLOOR
        assert rel_err(a, e) <= 2 * rel_err(b, e) + floor, f"{name}: {rel_err(a, e):.2e} vs {rel_err(b, e):.2e}"


def test_need_lse_false_returns_sdpa_output_only():
    q, k, v = make_qkv(1, 2, 20, 20, 8)
    out, lse = attention_with_lse(q, k, v, need_lse=False)
    assert lse is None
    assert rel_err(out, attention_with_lse_ref(q, k, v)[0]) <= FP32_RTOL


def test_explicit_scale():
    q, k, v = make_qkv(1, 1, 16, 16, 8)
    out, lse = attention_with_lse(q, k, v, scale=0.9)
    ref_out, ref_lse = attention_with_lse_ref(q, k, v, scale=0.9)
    assert rel_err(out, ref_out) <= FP32_RTOL and rel_err(lse, ref_lse) <= FP32_RTOL


def test_auto_dispatch_on_cpu():
    """CPU tensors with equal head dims take the CPU flash kernel; differing ones fall to SDPA;
    xformers names itself as CUDA-only."""
    q, k, v = make_qkv(1, 1, 8, 8, 8)
    assert attention_lse_path(q, k, v) == "cpu_flash"
    q, k, v = make_qkv(1, 1, 8, 8, 8, value_dim=16)
    assert attention_lse_path(q, k, v) == "sdpa"
    assert "CUDA" in path_unavailable_reason("xformers", q, k, v)
    with pytest.raises(BackendUnavailableError, match="backend='xformers' is unavailable"):
        attention_with_lse(q, k, v, backend="xformers")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"q": torch.randn(2, 8, 4)}, "q must be a non-empty"),
        ({"k": torch.randn(1, 2, 8, 5)}, r"must match q \(1, 2, 8, 4\) in B, H and D"),
        ({"v": torch.randn(1, 2, 9, 4)}, r"must match k \(1, 2, 8, 4\) in B, H and tokens"),
        ({"v": torch.randn(1, 2, 8, 4).double()}, "v has dtype torch.float64"),
        ({"scale": float("inf")}, "scale must be a finite non-zero float"),
        ({"need_lse": 1}, "need_lse must be True or False"),
        ({"backend": "flash"}, "backend must be 'auto'"),
    ],
)
def test_invalid_inputs(overrides, message):
    args = {"q": torch.randn(1, 2, 8, 4), "k": torch.randn(1, 2, 8, 4), "v": torch.randn(1, 2, 8, 4)}
    args.update(overrides)
    with pytest.raises(InputError, match=message):
        attention_with_lse(**args)


def test_triton_op_passes_opcheck():
    """Schema and autograd registration of the triton_op; on CUDA also its fake kernel (the
    launcher itself, which triton_op traces; under the CPU interpreter the launch cannot run on
    fake tensors, so that check needs a GPU)."""
    q, k, v = (t.detach() for t in make_qkv(1, 2, 20, 17, 16))
    _skip_unavailable("triton", q, k, v)
    checks = ("test_schema", "test_autograd_registration")
    if q.is_cuda:
        checks += ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.gnr_fast.attention_lse_fwd.default, (q, k, v, 0.25), test_utils=checks)
