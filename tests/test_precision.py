"""The precision policy (docs/precision.md): fp32 guidance math on fp16 inputs, loss scaling, the
VAE's dtype and finite check, and a model id that does not depend on the load dtype."""

import logging
import shutil

import numpy as np
import pytest
import torch

from gnr_fast.attention import CaptureMode, PassCapture
from gnr_fast.config import (
    FeatureSite,
    FeaturesMapL2,
    RescaleConfig,
    Role,
    SelfAttnMapL2,
    SelfAttnMapL2Appearance,
)
from gnr_fast.errors import ConfigError, InversionMismatchError, NonFiniteError
from gnr_fast.guiders import appearance_l1, features_map_l2, guider_energy
from gnr_fast.images import decode_latent, encode_latent
from gnr_fast.inversion import Inversion
from gnr_fast.loading import load_components
from gnr_fast.precision import FP16_LOSS_SCALE, PrecisionPolicy, energy_grad_to_latent
from gnr_fast.rescaling import rescale_factor, rescale_gamma


def _capture(maps=None, features=None):
    cap = PassCapture(layers=frozenset(maps or {}), mode=CaptureMode.MAPS)
    cap.maps.update(maps or {})
    cap.features.update(features or {})
    return cap


# --- guiders and rescaling compute in float32 -------------------------------------------------


def test_features_map_l2_does_not_overflow_in_fp16():
    cur = torch.full((1, 4, 8, 8), 150.0, dtype=torch.float16)
    inv = torch.full((1, 4, 8, 8), -150.0, dtype=torch.float16)  # Δ = 300: Δ² = 90000 > 65504
    e = features_map_l2(_capture(features={FeatureSite.UP: cur}), _capture(features={FeatureSite.UP: inv}), FeatureSite.UP)
    assert e.dtype == torch.float32
    assert e.item() == 90000.0


def test_appearance_l1_does_not_overflow_in_fp16():
    cur = torch.full((1, 4, 8, 8), 60000.0, dtype=torch.float16)
    inv = torch.full((1, 4, 8, 8), -60000.0, dtype=torch.float16)  # Δ = 120000 is inf in fp16
    e = appearance_l1(_capture(features={FeatureSite.UP_LAST: cur}), _capture(features={FeatureSite.UP_LAST: inv}), FeatureSite.UP_LAST)
    assert e.dtype == torch.float32
    assert e.item() == 120000.0


def test_scaled_attention_energy_backward_is_finite_in_fp16():
    """300000 · E as an fp16 tensor has an upstream gradient of 300000 = inf in fp16: the reference
    mode's fp16 failure (GuidanceError at step 1). In float32 the map gradient is finite and right."""
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(1, 2, 16, 16, generator=g), -1).half().requires_grad_(True)
    b = torch.softmax(torch.randn(1, 2, 16, 16, generator=g), -1).half()
    guider = SelfAttnMapL2(scale=300000.0)
    e = guider_energy(guider, 0, {Role.CUR_INV: _capture({0: a}), Role.INV_INV: _capture({0: b})}, frozenset({0}))
    assert e.dtype == torch.float32
    (grad,) = torch.autograd.grad(e, a)
    expected = 300000.0 * 2 * (a.double() - b.double()) / a.numel()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), expected, rtol=2e-3, atol=1e-3)  # fp16 rounding of the result


def test_appearance_guider_energy_is_float32_for_fp16_captures():
    a = torch.softmax(torch.randn(1, 2, 4, 4), -1).half()
    f = torch.randn(1, 3, 4, 4).half()
    caps = {
        Role.CUR_INV: _capture({0: a}, {FeatureSite.UP_LAST: f, FeatureSite.UP: f}),
        Role.INV_INV: _capture({0: a.flip(-1)}, {FeatureSite.UP_LAST: -f, FeatureSite.UP: -f}),
    }
    guider = SelfAttnMapL2Appearance(scale=1.0, self_attn_scale=300000.0, app_scale=500.0, new_features=True)
    assert guider_energy(guider, 0, caps, frozenset({0})).dtype == torch.float32
    assert guider_energy(FeaturesMapL2(scale=2.5), 0, {Role.CUR_TRG: caps[Role.CUR_INV], Role.INV_INV: caps[Role.INV_INV]},
                         frozenset()).dtype == torch.float32


def test_rescaling_norms_do_not_overflow_in_fp16():
    delta = torch.full((1, 4, 16, 16), 3000.0, dtype=torch.float16)  # ‖Δcfg‖ = 96000 > 65504
    grad = torch.full((1, 4, 16, 16), 30.0, dtype=torch.float16)  # ‖grad‖ = 960: ratio 0.01 → γ = 33
    config = RescaleConfig("range_other_on_cfg_norm", 0.33, 3.0)
    gamma = rescale_gamma(config, delta, grad)
    assert gamma.dtype == torch.float32 and gamma.ndim == 0
    assert gamma.item() == pytest.approx(0.33 / 0.01, rel=1e-5)
    assert rescale_factor(config, delta, grad) == gamma.item()
    big_grad = torch.full((1, 4, 16, 16), 30000.0, dtype=torch.float16)  # ‖grad‖ = 960000: ratio 10 → γ = 0.3
    assert rescale_factor(config, delta, big_grad) == pytest.approx(0.3, rel=1e-5)


# --- loss scaling -------------------------------------------------------------------------------


def _fp16_energy(z: torch.Tensor, weight: float) -> torch.Tensor:
    """An fp16 graph between z (fp32) and a float32 energy, as in a grad call of an fp16 UNet."""
    h = torch.tanh(z.half()) * 2  # fp16 ops: their backward runs in fp16
    return weight * torch.mean(h.float() ** 2)


def test_loss_scaling_rescues_gradients_that_underflow_fp16():
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))  # 16384 entries
    zf = z.clone().requires_grad_(True)
    # fp32 graph: median |grad| 1.3e-8, below fp16's smallest subnormal (6e-8)
    (ref,) = torch.autograd.grad(1e-4 * torch.mean((torch.tanh(zf) * 2) ** 2), zf)
    z1 = z.clone().requires_grad_(True)
    unscaled = energy_grad_to_latent(_fp16_energy(z1, 1e-4), z1, 1.0)
    z2 = z.clone().requires_grad_(True)
    scaled = energy_grad_to_latent(_fp16_energy(z2, 1e-4), z2, FP16_LOSS_SCALE)
    assert scaled.grad.dtype == torch.float32 and scaled.loss_scale == FP16_LOSS_SCALE
    # Measured (2026-12-07): unscaled every entry is exactly 0; scaled by 2^10: 0.1 % zeros, relative L2
    # distance 2.1e-3 (bound 2e-2; a 10 % noise measures 0.10), max |error| 0.44 % of max |grad| (bound 5 %).
    assert (unscaled.grad == 0).float().mean() > 0.9
    assert (scaled.grad == 0).float().mean() < 0.01
    assert ((scaled.grad.double() - ref.double()).norm() / ref.double().norm()).item() < 2e-2
    torch.testing.assert_close(scaled.grad, ref, rtol=0, atol=0.05 * ref.abs().max().item())


def test_loss_scale_backs_off_when_the_scaled_gradient_overflows(caplog):
    z = torch.zeros(1, 4, 8, 8, requires_grad=True)
    energy = 100.0 * z.half().float().sum()  # ∂E/∂z = 100; × 1024 = 102400 overflows fp16
    with caplog.at_level(logging.WARNING, logger="gnr_fast.precision"):
        result = energy_grad_to_latent(energy, z, 1024.0)
    assert result.loss_scale == 64.0  # 1024 / 16: 6400 fits
    assert torch.equal(result.grad, torch.full_like(z, 100.0))
    assert "overflowed at loss scale 1024" in caplog.text


def test_precision_policy_defaults_and_validation():
    assert PrecisionPolicy(torch.float16).grad_loss_scale == FP16_LOSS_SCALE
    assert PrecisionPolicy(torch.bfloat16).grad_loss_scale == 1.0
    assert PrecisionPolicy(torch.float32).grad_loss_scale == 1.0
    assert PrecisionPolicy(torch.float16, loss_scale=256).grad_loss_scale == 256.0
    assert PrecisionPolicy(torch.float16).vae_dtype(force_upcast=True) == torch.float32
    assert PrecisionPolicy(torch.float16).vae_dtype(force_upcast=False) == torch.float16
    assert PrecisionPolicy(torch.bfloat16, vae_upcast="always").vae_dtype(force_upcast=False) == torch.float32
    assert PrecisionPolicy(torch.float16, vae_upcast="never").vae_dtype(force_upcast=True) == torch.float16
    assert PrecisionPolicy(torch.float32, vae_upcast="never").vae_dtype(force_upcast=True) == torch.float32
    with pytest.raises(ConfigError, match="power of two"):
        PrecisionPolicy(torch.float16, loss_scale=1000)
    with pytest.raises(ConfigError, match="vae_upcast"):
        PrecisionPolicy(torch.float16, vae_upcast="sometimes")
    with pytest.raises(ConfigError, match="dtype"):
        PrecisionPolicy(torch.int8)


# --- VAE: dtype per force_upcast, finite check ---------------------------------------------------


class _Output:
    def __init__(self, sample=None, mean=None):
        self.sample = sample
        self.latent_dist = self
        self.mean = mean


class _GainVae(torch.nn.Module):
    """A VAE stand-in: decode multiplies by a gain (overflowing fp16 for large inputs), encode divides."""

    def __init__(self, gain: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(gain, dtype=dtype), requires_grad=False)

    @property
    def dtype(self):
        return self.gain.dtype

    @property
    def device(self):
        return self.gain.device

    def decode(self, z):
        return _Output(sample=z * self.gain - self.gain * 1000.0)

    def encode(self, x):
        return _Output(mean=x * self.gain)


def test_decode_retries_in_float32_when_fp16_overflows(caplog):
    vae = _GainVae(100.0, torch.float16)
    latent = torch.full((1, 4, 2, 2), 1000.0)  # 1000 · 100 = 1e5: inf in fp16; in fp32 1e5 − 1e5 = 0
    with caplog.at_level(logging.WARNING, logger="gnr_fast.images"):
        image = decode_latent(vae, latent, 1.0)
    assert (image == 127).all()  # (0 / 2 + 0.5) · 255 truncated
    assert "retrying in float32" in caplog.text
    assert vae.dtype == torch.float16  # the retry ran on a copy


def test_decode_raises_instead_of_writing_a_black_image():
    with pytest.raises(NonFiniteError, match="latent to decode"):
        decode_latent(_GainVae(1.0, torch.float32), torch.full((1, 4, 2, 2), float("nan")), 1.0)
    with pytest.raises(NonFiniteError, match="in float32"):
        decode_latent(_GainVae(1e30, torch.float32), torch.full((1, 4, 2, 2), 1e10), 1.0)
    with pytest.raises(NonFiniteError, match="again in float32"):
        decode_latent(_GainVae(float("inf"), torch.float16), torch.ones(1, 4, 2, 2), 1.0)


def test_encode_retries_in_float32_and_returns_float32():
    vae = _GainVae(1000.0, torch.float16)
    z = encode_latent(vae, torch.full((1, 3, 2, 2), 100.0), 0.5)  # 1e5: inf in fp16
    assert z.dtype == torch.float32
    assert torch.equal(z, torch.full((1, 3, 2, 2), 50000.0))


def test_vae_is_upcast_per_its_config(tiny_model_path):
    assert load_components(tiny_model_path, dtype=torch.float16).vae.dtype == torch.float32  # force_upcast: true
    never = PrecisionPolicy(torch.float16, vae_upcast="never")
    components = load_components(tiny_model_path, dtype=torch.float16, precision=never)
    assert components.vae.dtype == torch.float16 and components.unet.dtype == torch.float16
    with pytest.raises(ConfigError, match="differs from dtype"):
        load_components(tiny_model_path, dtype=torch.float32, precision=never)


# --- model id and inversion dtype ------------------------------------------------------------------


def test_model_id_does_not_depend_on_dtype_or_path(tiny_model_path, tmp_path):
    ids = {load_components(tiny_model_path, dtype=d).model_id for d in (torch.float32, torch.float16, torch.bfloat16)}
    assert len(ids) == 1
    copy = shutil.copytree(tiny_model_path, tmp_path / "elsewhere")
    assert load_components(copy).model_id in ids


def test_model_id_changes_when_a_probed_weight_changes(tiny_model_path, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(tiny_model_path, tmp_path / "changed")
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"] + 1e-3
    save_file(state, str(weights))
    assert load_components(copy).model_id != load_components(tiny_model_path).model_id


def _inversion(model_dtype):
    return Inversion(
        latents=torch.zeros(3, 1, 4, 8, 8), source_prompt="a red circle", num_steps=2, model_id="m",
        original_size=(64, 64), working_size=(64, 64), content_hash="h", model_dtype=model_dtype,
    )


def test_inversion_records_its_dtype_and_a_mismatch_says_so(tmp_path, caplog):
    inversion = _inversion("float32")
    assert Inversion.load(inversion.save(tmp_path / "a.inv")).model_dtype == "float32"
    with caplog.at_level(logging.WARNING, logger="gnr_fast.inversion"):
        inversion.check_compatible("m", 2, dtype=torch.float16)
    assert "computed in float32 with the model in float16" in caplog.text
    with pytest.raises(InversionMismatchError, match="computed in float32 but the editor runs in float16"):
        inversion.check_compatible("m", 2, dtype=torch.float16, allow_dtype_mismatch=False)
    inversion.check_compatible("m", 2, dtype=torch.float32, allow_dtype_mismatch=False)
    _inversion(None).check_compatible("m", 2, dtype=torch.float16, allow_dtype_mismatch=False)  # older files


def test_inverted_in_fp32_edits_in_fp16(tiny_model_path, sample_image):
    from gnr_fast import Editor

    inversion = Editor.from_pretrained(tiny_model_path).invert(sample_image, "a red circle", num_steps=3, progress=False)
    assert inversion.model_dtype == "float32"
    result = Editor.from_pretrained(tiny_model_path, dtype=torch.float16).edit(inversion, "a blue circle", progress=False)
    assert np.isfinite(np.asarray(result.image, dtype=np.float64)).all()
    assert torch.isfinite(result.latents).all()


def test_fp16_editor_with_a_strict_policy_refuses_an_fp32_inversion(tiny_model_path, sample_image):
    from gnr_fast import Editor

    inversion = Editor.from_pretrained(tiny_model_path).invert(sample_image, "a red circle", num_steps=2, progress=False)
    strict = PrecisionPolicy(model_dtype=torch.float16, allow_dtype_mismatch=False)
    editor = Editor.from_pretrained(tiny_model_path, dtype=torch.float16, precision=strict)
    with pytest.raises(InversionMismatchError, match="computed in float32 but the editor runs in float16"):
        editor.edit(inversion, "a blue circle", progress=False)
    with pytest.raises(ConfigError, match="differs from dtype"):
        Editor.from_pretrained(tiny_model_path, dtype=torch.float32, precision=strict)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_fp16_model_keeps_latents_and_guidance_terms_in_float32(tiny_model_path, sample_image, mode):
    """UNet and text encoder in float16; the trajectory, every step's latent, ε terms, ∂E/∂z and γ in
    float32; the VAE upcast (the tiny VAE's config says force_upcast, diffusers' default)."""
    from gnr_fast import Editor

    editor = Editor.from_pretrained(tiny_model_path, dtype=torch.float16)
    assert editor.components.unet.dtype == editor.components.text_encoder.dtype == torch.float16
    assert editor.components.vae.dtype == torch.float32
    inversion = editor.invert(sample_image, "a red circle", num_steps=3, progress=False)
    assert inversion.latents.dtype == torch.float32 and inversion.model_dtype == "float16"
    seen = []

    def record(step, t, z, terms):
        tensors = [z, terms.eps_u, terms.delta_cfg, terms.eps_final, terms.gamma]
        tensors += [terms.guider_grad] if terms.guider_grad is not None else []
        seen.append({x.dtype for x in tensors})

    result = editor.edit(inversion, "a blue circle", preset="nonstyle", mode=mode, progress=False, callback=record)
    assert seen == [{torch.float32}] * 3 and result.latents.dtype == torch.float32


def test_stored_probes_equal_the_fp32_modules_weights(tiny_model_path):
    from gnr_fast.loading import module_probes, stored_probes

    components = load_components(tiny_model_path)
    stored = stored_probes(tiny_model_path)
    loaded = module_probes(components.unet, components.vae, components.text_encoder)
    assert len(stored) == len(loaded) == 5
    assert all(torch.equal(a, b) for a, b in zip(stored, loaded))
