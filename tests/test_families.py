"""The model-family seam (issue 32 item 3, issue 34): a UNet with a guidance-scale embedding runs
plain and grad calls through the same modules as SD 1.x/2.x, chosen by its config alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel

from gnr_fast.attention.capture import CaptureSpec
from gnr_fast.config import FeatureSite
from gnr_fast.errors import UnsupportedArchitectureError
from gnr_fast.families import (
    FAMILIES,
    GuidanceEmbeddingSD,
    ModelFamily,
    StableDiffusion,
    family_for,
    guidance_scale_embedding,
    register_family,
)
from gnr_fast.runtime.modules import CapturingUNet, PlainUNet

TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
)


def tiny_unet(**extra) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY, **extra).eval().requires_grad_(False)


def test_family_is_chosen_by_the_config():
    assert isinstance(family_for(tiny_unet().config), StableDiffusion)
    family = family_for(tiny_unet(time_cond_proj_dim=16).config)
    assert isinstance(family, GuidanceEmbeddingSD) and family.embedding_dim == 16
    assert [e.name for e in family.extra_inputs] == ["timestep_cond"]
    with pytest.raises(UnsupportedArchitectureError, match="addition_embed_type"):
        family_for({"addition_embed_type": "text_time"})


def test_sd_call_through_the_seam_is_the_plain_diffusers_call():
    unet = tiny_unet()
    z, t, c = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 77, 8)
    expected = unet(z, t, encoder_hidden_states=c, return_dict=False)[0]
    assert torch.equal(PlainUNet(unet)(z, t, c), expected)


def test_guidance_embedding_unet_plain_and_grad_calls():
    unet = tiny_unet(time_cond_proj_dim=16)
    family = family_for(unet.config)
    layers, sites = family.install_captures(unet)
    assert len(layers) == 4 and FeatureSite.UP in sites  # down 1, mid 1, up 2
    z, t, c = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 77, 8)
    (cond,) = family.guidance_extras([0.0, 7.5])
    eps = PlainUNet(unet, family)(z, t, c, cond)
    direct = unet(z, t, encoder_hidden_states=c, timestep_cond=cond, return_dict=False)[0]
    assert torch.allclose(eps, direct, atol=1e-6)  # measured 0 (the processors' SDPA path is the default one)
    # w is per row and it matters: the w = 7.5 row differs from a w = 0 call of the same row
    (zero,) = family.guidance_extras([0.0, 0.0])
    assert torch.equal(PlainUNet(unet, family)(z, t, c, zero)[0], eps[0])
    assert not torch.allclose(PlainUNet(unet, family)(z, t, c, zero)[1], eps[1])
    # a grad call: captures of the last row, and a gradient to the latent through them
    spec = CaptureSpec(layers=frozenset(range(4)), feature_sites=frozenset({FeatureSite.UP}), rows=(1,))
    z_leaf = z.clone().requires_grad_(True)
    with torch.enable_grad():
        out, captured = CapturingUNet(unet, family)(z_leaf, t, c, spec, cond)
        energy = captured.features[0].square().mean() + sum(q.square().mean() for q in captured.queries)
        (grad,) = torch.autograd.grad(energy, z_leaf)
    assert torch.allclose(out, eps, atol=1e-6)
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0  # rows do not interact


def test_guidance_embedding_formula():
    emb = guidance_scale_embedding(torch.tensor([0.0, 2.0]), 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # w = 0 is not a zero vector
    freqs = torch.exp(torch.arange(4) * -(torch.log(torch.tensor(10000.0)) / 3))
    assert torch.allclose(emb[1], torch.cat([torch.sin(2000 * freqs), torch.cos(2000 * freqs)]))


def test_export_io_and_profiles():
    family = family_for(tiny_unet(time_cond_proj_dim=16).config)
    io = family.export_io
    assert io.inputs == ("sample", "timestep", "context", "timestep_cond")
    assert io.dynamic_axes["timestep_cond"] == {0: "batch"}
    profile = family.shape_profile((1, 2, 4), (8, 8)).shapes
    assert profile["timestep_cond"] == ((1, 16), (2, 16), (4, 16))
    assert profile["sample"][2] == (4, 4, 8, 8)
    assert family_for(tiny_unet().config).export_io.inputs == ("sample", "timestep", "context")


def test_a_new_family_needs_no_edit_of_the_package():
    """An SDXL-like family (pooled text embeddings + time ids as extra inputs) registered from here."""

    class PooledFamily(ModelFamily):
        name = "test-pooled"
        text_encoders = ("text_encoder", "text_encoder_2")

        @classmethod
        def matches(cls, unet_config: Mapping[str, Any]) -> bool:
            return unet_config.get("time_cond_proj_dim") == 12

        @property
        def extra_inputs(self):
            from gnr_fast.families import ExtraInput

            return (ExtraInput("timestep_cond", 12),)

        def unet_kwargs(self, extras):
            super().unet_kwargs(extras)
            return {"timestep_cond": extras[0] * 2}

    register_family(PooledFamily)
    try:
        unet = tiny_unet(time_cond_proj_dim=12)
        family = family_for(unet.config)
        assert isinstance(family, PooledFamily)
        z, t, c, cond = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 77, 8), torch.randn(1, 12)
        expected = unet(z, t, encoder_hidden_states=c, timestep_cond=cond * 2, return_dict=False)[0]
        assert torch.allclose(PlainUNet(unet)(z, t, c, cond), expected, atol=1e-6)
    finally:
        FAMILIES.remove(PooledFamily)
