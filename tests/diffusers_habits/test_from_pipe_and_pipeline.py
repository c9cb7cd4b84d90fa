"""Editor.from_pipe and GuideAndRescalePipeline on the tiny random SD pipeline: shared tensors, LoRAs,
bit-identical edits, the save/load round trip, output types, interrupt, refused pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gnr_fast import Editor, GuideAndRescalePipeline, Inversion
from gnr_fast.errors import InputError, UnsupportedArchitectureError

STEPS = 3
SOURCE, TARGET = "a red circle", "a green circle"


@pytest.fixture(scope="module")
def sd_pipe(tiny_model_path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def reference(tiny_model_path, sample_image_module):
    """Editor.from_pretrained's edit of the folder the pipelines load."""
    return Editor.from_pretrained(tiny_model_path).edit(sample_image_module, TARGET, source_prompt=SOURCE,
                                                         num_steps=STEPS, progress=False)


@pytest.fixture(scope="module")
def sample_image_module():
    from PIL import Image

    yy, xx = np.mgrid[:64, :64]
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[...] = (30, 60, 200)
    rgb[(yy - 32) ** 2 + (xx - 30) ** 2 < 15**2] = (220, 30, 30)
    return Image.fromarray(rgb)


def parameters(*modules):
    return [(p, p.data_ptr()) for module in modules for p in module.parameters()]


def test_from_pipe_shares_the_tensors_and_edits_like_from_pretrained(sd_pipe, reference, tiny_model_path,
                                                                      sample_image_module):
    before = parameters(sd_pipe.unet, sd_pipe.vae, sd_pipe.text_encoder)
    editor = Editor.from_pipe(sd_pipe)
    components = editor.components
    assert (components.unet, components.vae, components.text_encoder) == (sd_pipe.unet, sd_pipe.vae, sd_pipe.text_encoder)
    after = parameters(components.unet, components.vae, components.text_encoder)
    assert all(p is q and ptr == qtr for (p, ptr), (q, qtr) in zip(before, after)) and len(before) == len(after)
    assert editor.model_id == Editor.from_pretrained(tiny_model_path).model_id  # inversions are shared
    result = editor.edit(sample_image_module, TARGET, source_prompt=SOURCE, num_steps=STEPS, progress=False)
    assert torch.equal(result.latents, reference.latents)
    assert np.array_equal(np.asarray(result.image), np.asarray(reference.image))


class LoraLinear(torch.nn.Module):
    """A Linear with a low-rank update beside it, as peft's LoRA layers wrap attention projections."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.base_layer = base
        self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) * 0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, rank, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + x @ self.lora_A.T @ self.lora_B.T

    def delta(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A  # [out, in]


def test_loras_loaded_or_fused_into_the_pipe_are_used(tiny_model_path, reference, sample_image_module):
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(tiny_model_path)
    fused = StableDiffusionPipeline.from_pretrained(tiny_model_path)
    attention = [name for name, module in loaded.unet.named_modules() if name.endswith(("attn1", "attn2"))]
    fused_modules = dict(fused.unet.named_modules())
    for name in attention:
        module = loaded.unet.get_submodule(name)
        module.to_q = LoraLinear(module.to_q)
        with torch.no_grad():
            fused_modules[name].to_q.weight += module.to_q.delta()  # what fuse_lora does to the weight
    edits = {}
    for label, pipe in (("loaded", loaded), ("fused", fused)):
        editor = Editor.from_pipe(pipe)
        edits[label] = editor.edit(sample_image_module, TARGET, source_prompt=SOURCE, num_steps=STEPS, progress=False)
        edits[label + "_id"] = editor.model_id
    assert (edits["loaded"].latents - reference.latents).abs().max() > 0.1  # measured 3.9: the LoRA changes the edit
    # Loaded and fused differ only in rounding (x·Aᵀ·Bᵀ vs (W + BA)·x), grown by the guided steps; measured 1.45e-4.
    torch.testing.assert_close(edits["loaded"].latents, edits["fused"].latents, atol=2e-3, rtol=0)
    assert edits["loaded_id"] != edits["fused_id"]  # the loaded LoRA's parameters are part of the model id


def test_other_pipelines_are_refused_naming_the_supported_ones():
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    other = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    with pytest.raises(UnsupportedArchitectureError, match="DDIMPipeline; supported: StableDiffusionPipeline"):
        Editor.from_pipe(other)
    with pytest.raises(UnsupportedArchitectureError, match="supported: StableDiffusionPipeline"):
        GuideAndRescalePipeline.from_pipe(other)


@pytest.fixture(scope="module")
def gar_pipe(tiny_model_path):
    pipe = GuideAndRescalePipeline.from_pretrained(tiny_model_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_edits_bit_for_bit_like_editor_edit(gar_pipe, reference, sample_image_module):
    output = gar_pipe(sample_image_module, SOURCE, TARGET, num_inference_steps=STEPS, generator=torch.Generator())
    assert isinstance(output.images, list) and len(output.images) == 1 and not output.interrupted
    assert np.array_equal(np.asarray(output.images[0]), np.asarray(reference.image))
    assert output.steps_done == STEPS and output.inversion.num_steps == STEPS
    # Fresh inversions each time: an edit reusing an inversion's source cache differs from the first
    # edit of it in float rounding, so every call here is a first edit, like the reference.
    run = lambda output_type, **kw: gar_pipe(sample_image_module, SOURCE, TARGET, num_inference_steps=STEPS,  # noqa: E731
                                             output_type=output_type, **kw)
    assert torch.equal(run("latent").images, reference.latents)
    as_np, as_pt = run("np", return_dict=False), run("pt").images
    assert as_np[0].shape == (1, 64, 64, 3) and as_pt.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(as_np[0][0], np.asarray(reference.image, dtype=np.float32) / 255)
    assert torch.equal(as_pt[0], torch.from_numpy(as_np[0][0]).permute(2, 0, 1))
    assert isinstance(as_np[1], Inversion) and as_np[3] is False  # return_dict=False: the output's fields in order


def test_pipeline_callback_gets_the_pipe_and_can_interrupt(gar_pipe, sample_image_module):
    inversion = gar_pipe(sample_image_module, SOURCE, TARGET, num_inference_steps=STEPS, output_type="latent").inversion
    seen = []

    def stop_after_first(pipe, step, timestep, kwargs):
        seen.append((pipe, step, kwargs["latents"].clone()))
        pipe._interrupt = True
        return kwargs

    output = gar_pipe(inversion, None, TARGET, output_type="latent", callback_on_step_end=stop_after_first)
    assert output.interrupted and output.steps_done == 1 and len(seen) == 1
    assert seen[0][0] is gar_pipe and torch.equal(output.images, seen[0][2])
    assert not gar_pipe(inversion, None, TARGET, output_type="latent").interrupted  # cleared by the next call


def test_pipeline_refuses_a_non_generator(gar_pipe, sample_image_module):
    with pytest.raises(InputError, match="generator must be a torch.Generator"):
        gar_pipe(sample_image_module, SOURCE, TARGET, num_inference_steps=STEPS, generator=0)


def test_save_pretrained_round_trip_and_from_pipe(gar_pipe, sd_pipe, tmp_path):
    gar_pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "GuideAndRescalePipeline"
    loaded = GuideAndRescalePipeline.from_pretrained(tmp_path / "saved")
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(gar_pipe, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert Editor.from_pretrained(tmp_path / "saved").model_id == gar_pipe.editor.model_id
    shared = GuideAndRescalePipeline.from_pipe(sd_pipe)
    assert shared.unet is sd_pipe.unet and shared.vae is sd_pipe.vae and shared.text_encoder is sd_pipe.text_encoder
