"""The bundled model's distilled consistency models (issue 35): declared in its ``gnr_fast.json``
beside the default DDIM sampler, loaded through the ordinary consistency loader, measured to
reconstruct better than the teacher alone, and the 4-step demo end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image

from gnr_fast.cli import main
from gnr_fast.config import EditConfig
from gnr_fast.consistency_models import load_consistency_model, load_guidance_unet
from gnr_fast.demo import EXAMPLE_IMAGE
from gnr_fast.editor import Editor
from gnr_fast.errors import ConfigError, ModelLoadError
from gnr_fast.model_defaults import load_model_defaults
from gnr_fast.model_files import BUNDLED_MODEL
from gnr_shapes.training.consistency import Grid, reconstruction_batch, reconstruction_psnr
from gnr_shapes.training.unet import SD_SCHEDULE

SIZE_BUDGET = 40 * 2**20
"""Issue 35: the distilled files may add at most 40 MB to the bundled model."""


@pytest.fixture(scope="module")
def shipped():
    return load_model_defaults(BUNDLED_MODEL).consistency


def test_bundled_model_offers_consistency_beside_its_ddim_default(shipped):
    defaults = load_model_defaults(BUNDLED_MODEL)
    assert defaults.sampler == "ddim" and defaults.preset == "shapes"  # the default edit stays 50-step DDIM
    assert shipped.preset == "shapes_consistency" and shipped.timesteps == (259, 519, 779, 999)
    files = (shipped.teacher_unet, shipped.reverse_lora, shipped.forward_lora)
    assert all(f.is_file() and f.parent == BUNDLED_MODEL / "consistency" for f in files)
    assert sum(f.stat().st_size for f in files) <= SIZE_BUDGET


def test_offered_consistency_object_and_its_preset_are_validated(tmp_path):
    base = json.loads((BUNDLED_MODEL / "gnr_fast.json").read_text())
    cases = [
        ({"sampler": "consistency", "consistency": None}, ModelLoadError, "go together"),
        ({"consistency": {**base["consistency"], "preset": "shapes"}}, ConfigError, "not a consistency preset"),
    ]
    for change, error, message in cases:
        data = {k: v for k, v in {**base, **change}.items() if v is not None}
        (tmp_path / "gnr_fast.json").write_text(json.dumps(data))
        with pytest.raises(error, match=message):
            load_model_defaults(tmp_path)
    without = {k: v for k, v in base["consistency"].items() if k != "preset"}
    (tmp_path / "gnr_fast.json").write_text(json.dumps({**base, "consistency": without}))
    offered = load_model_defaults(tmp_path)
    assert offered.sampler == "ddim" and offered.consistency.preset == "consistency"  # the key's default


def test_editor_picks_the_sampler_the_call_asks_for(one_torch_thread):
    ddim = Editor.from_pretrained()
    assert ddim.fixed_sampler is None and ddim.default_preset == "shapes"  # default: 50-step DDIM
    few = Editor.from_pretrained(sampler="consistency")
    assert few.fixed_sampler is not None and few.fixed_sampler.boundaries == (259, 519, 779, 999)
    assert few.default_preset == "shapes_consistency"  # the folder's consistency preset
    with pytest.raises(ConfigError, match="sampler 'euler' is unknown"):
        Editor.from_pretrained(sampler="euler")


def test_shipped_forward_model_reconstructs_better_than_the_teacher_alone(shipped, one_torch_thread):
    """4-step inversion + 4-step reconstruction (w = 0) of 8 held-out scenes, as the training run
    measures it: the teacher used as both models vs the shipped files (cycle fine-tuned forward LoRA)."""
    model = load_consistency_model(None, dtype=torch.float32)  # the bundled model's shipped files
    c = model.components
    teacher = load_guidance_unet(dict(UNet2DConditionModel.load_config(BUNDLED_MODEL / "unet")),
                                 shipped.teacher_unet).eval()
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    grid = Grid.build(scheduler)
    with torch.no_grad():
        batch = reconstruction_batch(c.vae, c.text_encoder, c.tokenizer, 8, 128)
    alone = reconstruction_psnr(teacher, teacher, c.vae, batch, grid, scheduler)["recon_psnr_db"]
    trained = reconstruction_psnr(model.forward, c.unet, c.vae, batch, grid, scheduler)["recon_psnr_db"]
    assert trained >= alone + 1.0  # measured: 23.26 dB alone, 25.65 dB shipped (16 scenes: 21.12 / 22.94)


def test_demo_runs_the_4_step_edit_on_the_bundled_model(tmp_path, capsys, one_torch_thread):
    out = tmp_path / "demo.png"
    assert main(["demo", "--sampler", "consistency", "-o", str(out), "--quiet"]) == 0
    assert "(4-step consistency edit, shapes_consistency preset)" in capsys.readouterr().out
    with Image.open(out) as side:
        pixels = np.asarray(side.convert("RGB"), dtype=np.float32)
    assert pixels.shape == (128, 256, 3)  # input | edit at the model's 128²
    source, edited = pixels[:, :128], pixels[:, 128:]
    centre = (slice(44, 84), slice(44, 84))  # inside the example's large circle (red -> yellow)
    assert edited[centre][..., 1].mean() > source[centre][..., 1].mean() + 100  # measured: 40 -> 187
    for corner in ((slice(0, 20), slice(0, 20)), (slice(108, 128), slice(108, 128))):  # the blue background kept
        blue, red = edited[corner][..., 2].mean(), edited[corner][..., 0].mean()
        assert blue > red + 120  # measured: 190 vs 30 and 197 vs 26 (the input: 220 vs 40)
    with pytest.raises(SystemExit):
        main(["demo", "--sampler", "euler", "-o", str(out)])


def test_colour_matching_is_a_config_switch(one_torch_thread):
    """``match_colors`` (default on, the authors' post-processing) only changes the decoded image:
    on, its pixel mean and std are the input's; off, the same latents decode as they are."""
    editor = Editor.from_pretrained(sampler="consistency")
    image = Image.open(EXAMPLE_IMAGE)
    assert EditConfig.consistency().match_colors  # the authors' preset keeps their post-processing
    assert not EditConfig.shapes_consistency().match_colors  # tuned off for this model (background edits)
    matched_config = replace(EditConfig.shapes_consistency(), match_colors=True)
    source, target = "a large red circle on a blue background", "a large yellow circle on a blue background"
    inversion = editor.invert(image, source, progress=False)
    matched = editor.edit(inversion, target, config=matched_config, progress=False)
    plain = editor.edit(inversion, target, config=replace(matched_config, match_colors=False), progress=False)
    assert torch.equal(matched.latents, plain.latents)
    matched_px = np.asarray(matched.image.convert("RGB"), dtype=np.float64)
    plain_px = np.asarray(plain.image.convert("RGB"), dtype=np.float64)
    mean, std = inversion.pixel_stats
    assert abs(matched_px.mean() - mean) < 1.0 and abs(matched_px.std() - std) < 1.0  # uint8 truncation: < 1
    assert np.abs(matched_px - plain_px).max() > 2.0  # the switch changes the image
    with pytest.raises(ConfigError, match="match_colors must be true or false"):
        replace(matched_config, match_colors="no")
    assert EditConfig.from_dict({"guiders": [{"name": "cfg", "g_scale": 3.0}], "num_steps": 4,
                                 "match_colors": False}).match_colors is False
