"""Low-precision plain calls (issue 14, item 4): the autocast wrapper and its support checks."""

from __future__ import annotations

import pytest
import torch

from gnr_fast.errors import BackendUnavailableError, ConfigError
from gnr_fast import precision
from gnr_fast.precision import (
    AutocastPlainRunner,
    check_plain_dtype,
    cpu_has_bf16,
    with_plain_dtype,
)

CPU = torch.device("cpu")


class Plain:
    """The plain convention over a diffusers UNet, float32 out (what the eager plain runner does)."""

    name = "eager"

    def __init__(self, unet) -> None:
        self.unet = unet

    def __call__(self, latents, timestep, context):
        with torch.no_grad():
            return self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0].float()


def test_plain_dtype_checks(monkeypatch):
    check_plain_dtype(None, CPU)
    with pytest.raises(ConfigError, match="float16 is for CUDA devices; on CPU use torch.bfloat16"):
        check_plain_dtype(torch.float16, CPU)
    with pytest.raises(ConfigError, match="plain_dtype must be None, torch.bfloat16 or torch.float16"):
        check_plain_dtype(torch.float64, CPU)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(BackendUnavailableError, match="needs AVX-512 BF16 or AMX"):
        check_plain_dtype(torch.bfloat16, CPU)


def test_model_dtype_is_not_wrapped():
    runner = object()
    assert with_plain_dtype(runner, None, torch.float32, CPU) is runner


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no AVX-512 BF16 / AMX")
def test_bf16_plain_calls_stay_close_to_fp32(tiny_model_path):
    from gnr_fast.loading import load_components

    unet = load_components(tiny_model_path).unet
    fp32 = Plain(unet)
    low = with_plain_dtype(fp32, torch.bfloat16, torch.float32, CPU)
    assert isinstance(low, AutocastPlainRunner) and low.name == "eager+bfloat16"
    torch.manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    for t in (0, 500, 980):
        eps, ref = low(latents, torch.tensor(t), context), fp32(latents, torch.tensor(t), context)
        assert eps.dtype == torch.float32
        error = ((eps - ref).norm() / ref.norm()).item()
        # measured on the tiny UNet: 1.5e-2 median, 2.2e-2 max over 10-step inversions; float32 gives 0
        assert 1e-4 < error < 0.2, error


class _Unet(torch.nn.Module):
    """Just what the default predicate reads: the config's block widths and a weight's device/dtype."""

    def __init__(self, widest: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = type("Config", (), {"block_out_channels": (320, 640, widest)})()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_plain_dtype_is_bf16_only_for_float32_sd_size_unets_on_bf16_cpus(monkeypatch, native_bf16):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native_bf16)
    sd = _Unet(precision.SD_SIZE_CHANNELS)
    assert precision.bf16_plain_calls_pay_off(sd) is native_bf16
    assert precision.default_plain_dtype(sd) is (torch.bfloat16 if native_bf16 else None)
    assert not precision.bf16_plain_calls_pay_off(_Unet(precision.SD_SIZE_CHANNELS // 2))  # the small models
    assert not precision.bf16_plain_calls_pay_off(_Unet(precision.SD_SIZE_CHANNELS, torch.bfloat16))  # already low


def test_auto_plain_dtype_resolves_per_unet_and_splits_the_source_row(monkeypatch):
    from gnr_fast.runtime import RuntimeConfig
    from gnr_fast.runtime.backends import resolve_plain_dtype

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert RuntimeConfig().plain_dtype is None  # the default: the model dtype
    auto = RuntimeConfig(plain_dtype="auto")
    assert not auto.split_source
    sd = resolve_plain_dtype(auto, _Unet(precision.SD_SIZE_CHANNELS))
    assert sd.plain_dtype is torch.bfloat16 and sd.split_source  # ε_u/ε_trg in bf16, the source row float32
    small = resolve_plain_dtype(auto, _Unet(64))
    assert small.plain_dtype is None and not small.split_source
    onnx = resolve_plain_dtype(RuntimeConfig("onnx", "eager"), _Unet(precision.SD_SIZE_CHANNELS))
    assert onnx.plain_dtype is None  # exported backends run their export's dtype
    explicit = RuntimeConfig()
    assert resolve_plain_dtype(explicit, _Unet(precision.SD_SIZE_CHANNELS)) is explicit


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_model_dtype_is_bf16_only_for_sd_size_models_on_bf16_cpus(monkeypatch, native_bf16):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native_bf16)
    sd = _Unet(precision.SD_SIZE_CHANNELS)
    assert precision.default_model_dtype(sd, CPU) is (torch.bfloat16 if native_bf16 else torch.float32)
    assert precision.default_model_dtype(_Unet(64), CPU) is torch.float32  # the bundled and golden models
    assert precision.default_model_dtype(sd, torch.device("cuda")) is torch.float32  # nothing measured on a GPU


def test_auto_dtype_load_follows_the_predicate(monkeypatch, tiny_model_path):
    from gnr_fast.loading import load_components
    from gnr_fast.precision import PrecisionPolicy

    small = load_components(tiny_model_path, dtype="auto")  # 32-channel UNet: float32 here, any CPU
    assert small.dtype is torch.float32 and small.precision.model_dtype is torch.float32
    monkeypatch.setattr(precision, "bf16_plain_calls_pay_off", lambda unet: True)  # as for SD 1.5 on this CPU
    auto = load_components(tiny_model_path, dtype="auto")
    direct = load_components(tiny_model_path, dtype=torch.bfloat16)
    assert auto.dtype is torch.bfloat16 and auto.precision == PrecisionPolicy(model_dtype=torch.bfloat16)
    assert {p.dtype for m in (auto.unet, auto.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    assert auto.vae.dtype == direct.vae.dtype and auto.model_id == direct.model_id == small.model_id
    for a, b in zip(auto.unet.state_dict().values(), direct.unet.state_dict().values()):
        assert torch.equal(a, b)  # float32 load + cast = a bfloat16 load, bit for bit
    # an explicit policy's dtype wins over "auto"
    assert load_components(tiny_model_path, dtype="auto", precision=PrecisionPolicy()).dtype is torch.float32
