"""The gnr-fast command line, end to end in-process, and its one-line errors."""

import subprocess
import sys

import pytest
from PIL import Image

from gnr_fast.cli import main


@pytest.fixture
def image_file(sample_image, tmp_path):
    path = tmp_path / "in.png"
    sample_image.save(path)
    return path


def test_edit_writes_image_and_summary(tiny_model_path, image_file, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["edit", str(image_file), "-s", "a red circle", "-t", "a green circle", "-o", str(out),
                 "--model", str(tiny_model_path), "--steps", "4", "--quiet"])
    assert code == 0
    with Image.open(out) as edited:
        assert edited.size == (64, 64)
    line = capsys.readouterr().out
    assert "wrote" in line and "UNet calls" in line and "inversion" in line


def test_invert_then_edit(tiny_model_path, image_file, tmp_path, capsys):
    inv = tmp_path / "in.inv"
    assert main(["invert", str(image_file), "-s", "a red circle", "-o", str(inv), "--model", str(tiny_model_path),
                 "--steps", "4", "--quiet"]) == 0
    out = tmp_path / "e.png"
    assert main(["edit", "--inversion", str(inv), "-t", "a blue circle", "-o", str(out), "--model",
                 str(tiny_model_path), "--quiet"]) == 0
    assert out.is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "missing.png", "-s", "a", "-t", "b"], "does not exist"),
        (["edit", "{img}", "-t", "b"], "--source"),
        (["edit", "{img}", "-s", "a", "-t", ""], "target_prompt is empty"),
        (["edit", "{img}", "-s", "a", "-t", "b", "--steps", "0"], "num_steps"),
        (["edit", "{img}", "-s", "a", "-t", "b", "--config", "nope.yaml"], "does not exist"),
        (["edit", "-t", "b"], "give an IMAGE"),
        (["edit", "--inversion", "nope.inv", "-t", "b"], "does not exist"),
    ],
)
def test_user_errors_are_one_line(tiny_model_path, image_file, argv, message, capsys):
    argv = [a.replace("{img}", str(image_file)) for a in argv] + ["--model", str(tiny_model_path), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_model_path_is_one_line(image_file, tmp_path, capsys):
    assert main(["edit", str(image_file), "-s", "a", "-t", "b", "--model", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gnr_fast.cli", "edit", "nope.png", "-s", "a", "-t", "b", "--model",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_demo_writes_input_and_edit_side_by_side(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out), "--model", str(tiny_model_path), "--steps", "2", "--quiet"]) == 0
    with Image.open(out) as side:
        assert side.size == (128, 64)  # the tiny model works at 64x64: input | edit
    assert "(nonstyle preset)" in capsys.readouterr().out  # 'shapes' is only the bundled model's default


def test_demo_on_the_bundled_model_uses_its_preset(tmp_path, capsys):
    from gnr_fast.loading import BUNDLED_MODEL

    if not (BUNDLED_MODEL / "model_index.json").is_file():
        pytest.skip(f"bundled model missing at {BUNDLED_MODEL}")
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out), "--steps", "2", "--quiet"]) == 0
    assert "(shapes preset)" in capsys.readouterr().out and out.is_file()
