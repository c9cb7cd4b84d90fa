"""Tests of ``gnr_fast.ops.rescale_norms`` (both rescale norms and γ per image in one launch).

The Triton kernel runs under the interpreter on CPU tensors (compiled on CUDA with a GPU); see
the ``triton_device`` fixture of ``tests/kernels/conftest.py``.

Tolerances: both sides accumulate squares in float32 from the same inputs and differ only in
summation order (the kernel: 1024 lanes, then a tree; ``vector_norm``: its own blocking).
Measured worst relative error of the norms and γ over these shapes: 3.7e-7; bound 1e-5. Where γ
is clipped the bound applies to γ = clip/ratio, which inherits the ratio's error.
"""

from __future__ import annotations

import logging

import pytest
import torch

from gnr_fast.config import RescaleConfig
from gnr_fast.errors import BackendUnavailableError, InputError
from gnr_fast.ops import rescale_norms as ops
from gnr_fast.ops import triton_kernels
from gnr_fast.ops.path_choice import forget_logged_choices
from gnr_fast.ops.rescale_norms import (
    rescale_gammas,
    rescale_gammas_ref,
    rescale_triton_supported,
)
from gnr_fast.rescaling import rescale_gamma
from kernel_error import rel_err

FP32_RTOL = 1e-5


def make_terms(shape, dtype=torch.float32, device="cpu", seed=0, grad_scales=None):
    """(Δcfg, grad) with per-image gradient scales that put the ratio below, inside and above
    the bounds (so γ is clipped up, 1, and clipped down)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    scales = grad_scales or [0.05, 1.0, 20.0, 0.7][: shape[0]]
    grad = grad * torch.tensor(scales).view(-1, *([1] * (len(shape) - 1)))
    return cfg.to(device, dtype), grad.to(device, dtype)


SHAPES = [(1, 4, 8, 8), (3, 4, 17, 13), (2, 1000), (4, 4, 33, 32)]  # 256 … 4224 values per image
BOUNDS = [(0.33, 3.0), (1.5, 1.5)]  # the presets' ranges (DESIGN.md §6)


@pytest.mark.parametrize("bounds", BOUNDS, ids=lambda b: f"{b[0]}-{b[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, dtype, bounds, triton_device):
    cfg, grad = make_terms(shape, dtype, triton_device)
    assert rescale_triton_supported(cfg, grad, allow_interpreter=True)
    gamma, norms = rescale_gammas(cfg, grad, *bounds, backend="triton")
    ref_gamma, ref_norms = rescale_gammas_ref(cfg, grad, *bounds)
    assert gamma.shape == (shape[0],) and norms.shape == (shape[0], 2)
    assert gamma.dtype == norms.dtype == torch.float32 and gamma.device == cfg.device
    assert rel_err(norms, ref_norms) <= FP32_RTOL, f"norms: {rel_err(norms, ref_norms):.2e}"
    assert rel_err(gamma, ref_gamma) <= FP32_RTOL, f"gamma: {rel_err(gamma, ref_gamma):.2e}"


def test_triton_edge_cases(triton_device):
    """γ = 1 for a zero gradient; ratio = 1 (γ = clip(1)/1) for a zero Δcfg."""
    cfg, grad = make_terms((3, 40), device=triton_device)
    cfg[1] = 0
    grad[0] = 0
    gamma, norms = rescale_gammas(cfg, grad, 1.5, 2.0, backend="triton")
    ref_gamma, _ = rescale_gammas_ref(cfg, grad, 1.5, 2.0)
    assert gamma[0].item() == 1.0 and norms[0, 1].item() == 0.0
    assert gamma[1].item() == pytest.approx(1.5) and norms[1, 0].item() == 0.0
    torch.testing.assert_close(gamma, ref_gamma)


def test_reference_equals_the_rescalers_formula():
    """Per image, the reference is rescaling.rescale_gamma (the engine's formula) of that image."""
    cfg, grad = make_terms((3, 4, 9, 9))
    config = RescaleConfig(kind="range_other_on_cfg_norm", lo=0.33, hi=3.0)
    gamma, _ = rescale_gammas_ref(cfg, grad, 0.33, 3.0)
    for b in range(3):  # the same float32 sums, perhaps in another order: bound 1e-6, measured 0
        assert rel_err(gamma[b], rescale_gamma(config, cfg[b : b + 1], grad[b : b + 1])) <= 1e-6


def test_triton_op_passes_opcheck(triton_device):
    """Schema (and on CUDA the fake kernel) of the triton_op; under the CPU interpreter the
    launcher cannot run on fake tensors."""
    cfg, grad = make_terms((2, 4, 5, 5), device=triton_device)
    checks = ("test_schema",) + (("test_faketensor", "test_aot_dispatch_dynamic") if cfg.is_cuda else ())
    torch.library.opcheck(torch.ops.gnr_fast.rescale_gamma.default, (cfg, grad, 0.33, 3.0), test_utils=checks)


def test_cpu_auto_takes_torch_and_logs_once(caplog):
    forget_logged_choices()
    cfg, grad = make_terms((2, 30))
    assert not rescale_triton_supported(cfg, grad)
    with caplog.at_level(logging.INFO, logger="gnr_fast.ops.rescale_norms"):
        for _ in range(3):
            gamma, _ = rescale_gammas(cfg, grad, 0.33, 3.0)
    assert torch.equal(gamma, rescale_gammas_ref(cfg, grad, 0.33, 3.0)[0])
    lines = [r.getMessage() for r in caplog.records if "rescale_gammas uses" in r.getMessage()]
    assert len(lines) == 1 and "torch path" in lines[0], lines


def test_forced_triton_unavailable_names_why(monkeypatch):
    monkeypatch.setattr(triton_kernels, "triton_importable", lambda: False)
    cfg, grad = make_terms((1, 3))
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        rescale_gammas(cfg, grad, 0.33, 3.0, backend="triton")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"grad": torch.zeros(2, 4)}, "grad must have the shape"),
        ({"lo": 0.0}, "lo must be a finite positive"),
        ({"hi": float("inf")}, "hi must be a finite positive"),
        ({"lo": 2.0, "hi": 1.0}, "lo must be at most hi"),
        ({"delta_cfg": torch.zeros(2, 3, dtype=torch.int64)}, "floating-point"),
        ({"backend": "cuda"}, "backend must be"),
    ],
)
def test_invalid_inputs_raise_input_error(overrides, message):
    args = {"delta_cfg": torch.ones(2, 3), "grad": torch.ones(2, 3), "lo": 0.33, "hi": 3.0, **overrides}
    with pytest.raises(InputError, match=message):
        rescale_gammas(**args)
