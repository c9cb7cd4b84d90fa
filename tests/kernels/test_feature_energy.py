"""Tests of ``gnr_fast.ops.feature_energy`` (appearance L1 / features L2) against its torch reference.

The Triton kernel runs under the interpreter on CPU tensors (compiled on CUDA when a GPU is
present): the ``triton_device`` fixture of ``tests/kernels/conftest.py``.

Tolerances: the kernel and the reference both compute in float32 from the same inputs; they differ
only in summation order (4096-value partials) and in 2·d·(1/M) vs autograd's order of the same
products. Measured worst relative errors over these shapes: energy 1.7e-7 (every dtype);
gradient 0 in float32 (both kinds) and for float16 L1, 2.6e-4 float16 L2, 4.6e-3 bfloat16 — the
gradient is rounded once to the input dtype on both sides, at most one ulp apart (bfloat16: up
to 2^-7 relative). Bounds: 1e-5 (float32, and the float32 energies of half inputs); gradients
5e-3 for float16 (19× its 2.6e-4) and 2e-2 for bfloat16 (4× its 4.6e-3: one bfloat16 ulp is up to
7.8e-3 of the largest entry, so two roundings may differ by that).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from gnr_fast.errors import BackendUnavailableError, InputError
from gnr_fast.ops import triton_kernels
from gnr_fast.ops.feature_energy import (
    feature_energy,
    feature_energy_ref,
    feature_energy_triton_supported,
    mean_feature_energy,
)
from gnr_fast.ops.path_choice import forget_logged_choices
from kernel_error import rel_err

# The module, not the function of the same name that ``gnr_fast.ops`` re-exports.
ops = importlib.import_module("gnr_fast.ops.feature_energy")

FP32_RTOL = 1e-5
GRAD_RTOL = {torch.float32: FP32_RTOL, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # measured 0, 2.6e-4, 4.6e-3


def make_features(shape, dtype=torch.float32, device="cpu", seed=0):
    """(Φ, Φ*): a source map and a perturbed current one (requires grad), with some exact ties."""
    gen = torch.Generator().manual_seed(seed)
    inv = torch.randn(shape, generator=gen)
    cur = inv + 0.5 * torch.randn(shape, generator=gen)
    cur.view(-1)[::7] = inv.view(-1)[::7]  # d = 0: the L1 gradient is 0 there (torch's sign)
    return cur.to(device, dtype).requires_grad_(), inv.to(device, dtype)


def energy_and_grad(fn, cur, inv, kind, **kwargs):
    """(per-image energies, ∂(Σ_b w_b E_b)/∂Φ) with fixed weights w_b (per-image upstream grads)."""
    energy = fn(cur, inv, kind, **kwargs)
    weights = torch.linspace(0.5, 2.0, energy.numel(), dtype=energy.dtype, device=energy.device)
    (grad,) = torch.autograd.grad((energy * weights).sum(), cur)
    return energy.detach(), grad


# Values per image below, at and past one 4096-value block, none a block multiple except 4096.
SHAPES = [(1, 4, 5, 7), (2, 3, 50, 30), (3, 4096), (2, 1, 9001)]


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, dtype, kind, triton_device):
    cur, inv = make_features(shape, dtype, triton_device)
    assert feature_energy_triton_supported(cur, allow_interpreter=True)
    energy, grad = energy_and_grad(feature_energy, cur, inv, kind, backend="triton")
    ref_energy, ref_grad = energy_and_grad(feature_energy_ref, cur, inv, kind)
    assert energy.shape == (shape[0],) and energy.dtype == torch.float32
    assert grad.dtype == dtype and grad.shape == cur.shape
    assert rel_err(energy, ref_energy) <= FP32_RTOL, f"energy: {rel_err(energy, ref_energy):.2e}"
    assert rel_err(grad, ref_grad) <= GRAD_RTOL[dtype], f"grad: {rel_err(grad, ref_grad):.2e}"


def test_triton_gradient_reaches_the_source_features_too(triton_device):
    cur, inv = make_features((2, 3, 11), device=triton_device)
    inv.requires_grad_()
    weights = torch.tensor([1.0, -3.0], device=triton_device)
    got = torch.autograd.grad((feature_energy(cur, inv, "l2", backend="triton") * weights).sum(), (cur, inv))
    want = torch.autograd.grad((feature_energy_ref(cur, inv, "l2") * weights).sum(), (cur, inv))
    for a, e in zip(got, want):
        assert rel_err(a, e) <= FP32_RTOL


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_mean_matches_the_guiders_expression(kind, triton_device):
    """The batch mean the guiders use, on the Triton path, equals their torch expression."""
    cur, inv = make_features((2, 4, 13, 9), device=triton_device)
    diff = cur.float() - inv.float()
    expected = torch.mean(diff.abs() if kind == "l1" else diff**2)
    energy = ops._TritonFeatureEnergy.apply(cur, inv, kind).mean()
    assert rel_err(energy, expected) <= FP32_RTOL
    got, want = (torch.autograd.grad(e, cur)[0] for e in (energy, expected))
    assert rel_err(got, want) <= FP32_RTOL


def test_triton_op_passes_opcheck(triton_device):
    """Schema and autograd registration of the triton_op; on CUDA also the fake kernel (the
    launcher, which under the CPU interpreter cannot run on fake tensors)."""
    cur, inv = (t.detach() for t in make_features((2, 3, 10), device=triton_device))
    checks = ("test_schema", "test_autograd_registration")
    if cur.is_cuda:
        checks += ("test_faketensor", "test_aot_dispatch_dynamic")
    for squared in (False, True):
        torch.library.opcheck(torch.ops.gnr_fast.feature_energy_fwd.default, (cur, inv, squared), test_utils=checks)


def test_gradcheck_reference_and_gradient_formula():
    """The reference is what autograd says (float64 gradcheck), and the kernel's closed-form
    gradient (sign(d)/M, 2d/M) is that gradient."""
    cur, inv = (t.double() for t in make_features((2, 3, 4)))
    cur = cur.detach().requires_grad_()
    for kind in ("l1", "l2"):
        assert torch.autograd.gradcheck(lambda c, k=kind: feature_energy_ref(c, inv, k), (cur,))
    (grad,) = torch.autograd.grad(feature_energy_ref(cur, inv, "l2").sum(), cur)
    torch.testing.assert_close(grad, 2 * (cur - inv).detach() / 12)


def test_cpu_auto_is_the_torch_expression_bit_for_bit():
    """Off CUDA, auto takes the torch path, and the guiders' mean is their former expression."""
    cur, inv = make_features((1, 4, 8, 8))
    assert not feature_energy_triton_supported(cur)
    diff = cur.float() - inv.float()
    assert torch.equal(mean_feature_energy(cur, inv, "l1"), torch.mean(torch.abs(diff)))
    assert torch.equal(mean_feature_energy(cur, inv, "l2"), torch.mean(diff**2))
    assert torch.equal(feature_energy(cur, inv, "l1"), feature_energy_ref(cur, inv, "l1"))


def test_cpu_dispatch_is_logged_once(caplog):
    forget_logged_choices()
    cur, inv = make_features((1, 3))
    with caplog.at_level(logging.INFO, logger="gnr_fast.ops.feature_energy"):
        for _ in range(3):
            feature_energy(cur, inv, "l1")
    lines = [r.getMessage() for r in caplog.records if "feature_energy uses" in r.getMessage()]
    assert len(lines) == 1 and "torch path" in lines[0] and "CPU" in lines[0], lines


def test_forced_triton_off_the_interpreter_names_why(monkeypatch):
    monkeypatch.setattr(triton_kernels, "triton_importable", lambda: False)
    cur, inv = make_features((1, 3))
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        feature_energy(cur, inv, "l2", backend="triton")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(2, 3), torch.zeros(2, 4), "l1"), "inv must have the shape"),
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16), "l1"), "must share one of"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), "l3"), "kind must be 'l1' or 'l2'"),
        ((torch.zeros(0), torch.zeros(0), "l1"), "non-empty"),
        ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64), "l1"), "must share one of"),
    ],
)
def test_invalid_inputs_raise_input_error(args, message):
    with pytest.raises(InputError, match=message):
        feature_energy(*args)
