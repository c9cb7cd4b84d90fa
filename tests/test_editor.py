"""End-to-end editing on the tiny random pipeline: API contract, inversion reuse, bad inputs."""

import numpy as np
import pytest
import torch

from gnr_fast import EditConfig, Editor, Inversion
from gnr_fast.config import CfgGuider, LatentsDiff, RescaleConfig
from gnr_fast.errors import ConfigError, InputError, InversionMismatchError
from gnr_fast.prompts import PromptTruncatedWarning

STEPS = 6


@pytest.fixture(scope="module")
def inversion(tiny_editor):
    from PIL import Image

    yy, xx = np.mgrid[:64, :64]
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[...] = (30, 60, 200)
    rgb[(yy - 32) ** 2 + (xx - 30) ** 2 < 225] = (220, 30, 30)
    return tiny_editor.invert(Image.fromarray(rgb), "a red circle", num_steps=STEPS, progress=False)


def test_inversion_shape_and_metadata(inversion, tiny_editor):
    assert inversion.latents.shape == (STEPS + 1, 1, 4, 8, 8)
    assert inversion.source_prompt == "a red circle" and inversion.model_id == tiny_editor.model_id
    assert inversion.working_size == (64, 64)


def test_edit_result_contract(tiny_editor, inversion):
    result = tiny_editor.edit(inversion, "a green circle", mode="reference", progress=False)
    assert result.image.size == (64, 64) and result.image.mode == "RGB"
    assert result.latents.shape == (1, 4, 8, 8) and torch.isfinite(result.latents).all()
    assert result.inversion is inversion
    assert result.timings.editing_s > 0 and result.timings.inversion_s == 0
    assert result.unet_calls == 4 * STEPS  # reference mode: four passes every step


def test_edit_from_image_equals_edit_from_inversion(tiny_editor, sample_image, tmp_path):
    direct = tiny_editor.edit(sample_image, "a green circle", source_prompt="a red circle", num_steps=STEPS, progress=False)
    inv = tiny_editor.invert(sample_image, "a red circle", num_steps=STEPS, progress=False)
    path = inv.save(tmp_path / "x.inv")
    reused = tiny_editor.edit(Inversion.load(path), "a green circle", progress=False)
    torch.testing.assert_close(reused.latents, direct.latents)
    assert direct.timings.inversion_s > 0


def test_guidance_changes_the_result(tiny_editor, inversion):
    cfg_only = EditConfig(guiders=(CfgGuider(7.5),), num_steps=STEPS)
    guided = tiny_editor.edit(inversion, "a green circle", progress=False)
    plain = tiny_editor.edit(inversion, "a green circle", config=cfg_only, progress=False)
    assert not torch.allclose(guided.latents, plain.latents)


def test_callback_sees_every_step(tiny_editor, inversion):
    seen = []
    tiny_editor.edit(inversion, "a green circle", progress=False, callback=lambda i, t, z, terms: seen.append((i, t, terms.gamma)))
    assert [s[0] for s in seen] == list(range(STEPS))
    assert seen[0][1] == 1000 // STEPS * (STEPS - 1) and seen[-1][1] == 0


def test_style_preset_and_latents_diff(tiny_editor, inversion):
    style = tiny_editor.edit(inversion, "a painting of a red circle", preset="style", progress=False)
    assert torch.isfinite(style.latents).all()
    cfg = EditConfig(guiders=(CfgGuider(7.5), LatentsDiff(1.0)), rescale=RescaleConfig("identity_rescaler"), num_steps=STEPS)
    assert torch.isfinite(tiny_editor.edit(inversion, "a green circle", config=cfg, progress=False).latents).all()


def test_exact_alignment_option_differs(tiny_editor, inversion):
    base = EditConfig.nonstyle(STEPS)
    from dataclasses import replace

    exact = tiny_editor.edit(inversion, "a green circle", config=replace(base, align_inversion="exact"), progress=False)
    ref = tiny_editor.edit(inversion, "a green circle", config=base, progress=False)
    assert not torch.allclose(exact.latents, ref.latents)


def test_v_prediction_model_edits(tiny_vpred_model_path, sample_image):
    editor = Editor.from_pretrained(tiny_vpred_model_path)
    assert editor.components.schedule.prediction_type == "v_prediction"
    result = editor.edit(sample_image, "a green circle", source_prompt="a red circle", num_steps=4, progress=False)
    assert torch.isfinite(result.latents).all()


def test_yaml_config_path(tiny_editor, inversion, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"num_steps: {STEPS}\nguiders: [{{name: cfg, g_scale: 5.0}}]\n")
    assert torch.isfinite(tiny_editor.edit(inversion, "a green circle", config=str(path), progress=False).latents).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target_prompt=""), InputError, "target_prompt is empty"),
        (dict(target_prompt="   "), InputError, "target_prompt is empty"),
        (dict(target_prompt=None), InputError, "must be a string"),
        (dict(mode="turbo"), InputError, "mode"),
        (dict(preset="anime"), ConfigError, "preset"),
        (dict(source_prompt="a cat"), InputError, "differs"),
        (dict(num_steps=STEPS + 1), InversionMismatchError, "steps"),
    ],
)
def test_bad_edit_arguments(tiny_editor, inversion, kwargs, error, match):
    args = dict(target_prompt="a green circle", progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        tiny_editor.edit(inversion, **args)


def test_image_needs_source_prompt(tiny_editor, sample_image):
    with pytest.raises(InputError, match="source_prompt is required"):
        tiny_editor.edit(sample_image, "a green circle", progress=False)


@pytest.mark.parametrize("steps", [0, -3, 2.5, 5000])
def test_bad_step_counts(tiny_editor, sample_image, steps):
    with pytest.raises(InputError, match="num_steps"):
        tiny_editor.invert(sample_image, "a red circle", num_steps=steps)


def test_inversion_from_another_model_is_refused(tiny_vpred_model_path, inversion):
    other = Editor.from_pretrained(tiny_vpred_model_path)
    with pytest.raises(InversionMismatchError, match="invert the image again"):
        other.edit(inversion, "a green circle", progress=False)


def test_long_prompt_warns(tiny_editor):
    with pytest.warns(PromptTruncatedWarning, match="first 77"):
        tiny_editor.embed("word " * 100)


def test_inversion_file_roundtrip_and_errors(inversion, tmp_path):
    path = inversion.save(tmp_path / "a.inv")
    loaded = Inversion.load(path)
    torch.testing.assert_close(loaded.latents, inversion.latents)
    assert (loaded.source_prompt, loaded.num_steps, loaded.model_id) == (inversion.source_prompt, STEPS, inversion.model_id)
    assert loaded.original_size == inversion.original_size and loaded.content_hash == inversion.content_hash
    junk = tmp_path / "junk.inv"
    junk.write_bytes(b"nope")
    with pytest.raises(InputError, match="not a gnr-fast inversion"):
        Inversion.load(junk)
    with pytest.raises(InputError, match="does not exist"):
        Inversion.load(tmp_path / "missing.inv")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(InputError, match="not a gnr-fast inversion"):
        Inversion.load(other)


def test_default_preset_is_resolved_in_one_place(tiny_editor):
    from types import SimpleNamespace

    from gnr_fast.requests import preset_name, resolve_config

    assert preset_name(SimpleNamespace(), None) == "nonstyle"  # an editor without model metadata
    model = SimpleNamespace(default_preset="style")
    assert preset_name(model, None) == "style" and preset_name(model, "nonstyle") == "nonstyle"
    assert resolve_config(model, None, num_steps=4) == EditConfig.style(4)
    assert tiny_editor.resolve_config(num_steps=4) == EditConfig.preset(preset_name(tiny_editor, None), 4)


def test_half_precision_weights_keep_the_loop_in_float32(tiny_model_path, sample_image):
    """Latents, the inversion trajectory and the DDIM update stay float32; only the UNet runs in bf16."""
    editor = Editor.from_pretrained(tiny_model_path, dtype=torch.bfloat16)
    result = editor.edit(sample_image, "a green circle", source_prompt="a red circle", num_steps=3, progress=False)
    assert result.inversion.latents.dtype == torch.float32 and result.latents.dtype == torch.float32
    assert torch.isfinite(result.latents).all()
