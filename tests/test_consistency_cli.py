"""`gnr-fast edit --model DIR` on a consistency-model folder (issue 34): the sampler and the three files
come from its gnr_fast.json; the same folder without the file needs the explicit file options."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gnr_fast.cli import main
from gnr_fast.config import EditConfig
from gnr_fast.editor import Editor
from gnr_fast.errors import ConfigError
from gnr_fast.inversion import Inversion
from gnr_fast.samplers import ConsistencySampler
from tests.consistency_model import consistency_model_dir

SRC = "a red circle on a blue background"
TRG = "a green circle on a blue background"


def test_cli_edit_with_model_folder_alone(golden_dir, tmp_path, one_torch_thread):
    folder = consistency_model_dir(golden_dir, tmp_path / "icd")
    out = tmp_path / "edited.png"
    scene = golden_dir / "consistency_scene0"
    code = main(["edit", str(scene / "input.png"), "-s", SRC, "-t", TRG, "--model", str(folder), "-o", str(out),
                 "--quiet"])
    assert code == 0
    ours = np.asarray(Image.open(out).convert("RGB")).astype(float)
    golden = np.asarray(Image.open(scene / "edited.png").convert("RGB")).astype(float)
    mse = ((ours - golden) ** 2).mean()
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 60.0  # measured 72.3 dB (the parity test's edit)


def test_editor_from_pretrained_dispatches_on_the_folder(golden_dir, tmp_path):
    """The folder's gnr_fast.json selects the consistency sampler: the same Editor (one session, an
    executor per fused UNet); configs it cannot run are refused before any UNet call."""
    folder = consistency_model_dir(golden_dir, tmp_path / "icd")
    editor = Editor.from_pretrained(folder)
    assert isinstance(editor.fixed_sampler, ConsistencySampler) and editor.fixed_sampler.num_steps == 4
    assert editor.inversion_runner is not editor.runner and editor.default_preset == "consistency"
    image = golden_dir / "consistency_scene0" / "input.png"
    with pytest.raises(ConfigError, match="edits in 4 steps"):
        editor.edit(image, TRG, source_prompt=SRC, config=EditConfig.style(50))  # a 50-step DDIM config
    with pytest.raises(ConfigError, match="'style' is a DDIM preset"):
        editor.edit(image, TRG, source_prompt=SRC, preset="style")
    with pytest.raises(ConfigError, match="mode='fast'"):
        editor.edit(image, TRG, source_prompt=SRC, mode="reference")
    assert editor.runner.rows == 0 and editor.inversion_runner.rows == 0
    onnx = Editor.from_pretrained(folder, runtime="onnx")  # exports (with timestep_cond) made on the first call
    assert onnx.runner.plain_runner.name == onnx.inversion_runner.plain_runner.name == "onnx"


def test_cli_invert_then_edit_the_saved_inversion(golden_dir, tmp_path, one_torch_thread):
    """`gnr-fast invert` on a consistency model saves its 4-step inversion with the input's colour
    statistics; `gnr-fast edit --inversion` edits it to the golden edit."""
    folder = consistency_model_dir(golden_dir, tmp_path / "icd")
    scene = golden_dir / "consistency_scene0"
    saved, out = tmp_path / "scene.inv", tmp_path / "edited.png"
    assert main(["invert", str(scene / "input.png"), "-s", SRC, "-o", str(saved), "--model", str(folder),
                 "--quiet"]) == 0
    inversion = Inversion.load(saved)
    assert inversion.num_steps == 4 and abs(inversion.pixel_stats[0] - 95.72062174479167) < 1e-9  # golden.json
    assert main(["edit", "--inversion", str(saved), "-t", TRG, "--model", str(folder), "-o", str(out), "--quiet"]) == 0
    ours = np.asarray(Image.open(out).convert("RGB")).astype(float)
    golden = np.asarray(Image.open(scene / "edited.png").convert("RGB")).astype(float)
    mse = ((ours - golden) ** 2).mean()
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 60.0  # measured 72.3 dB (the parity test's edit)
