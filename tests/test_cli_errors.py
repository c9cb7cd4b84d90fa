"""Every subcommand's user and I/O errors end in one line on stderr and exit code 2.

Output locations are checked before any long work: the tests replace the model loader (or the
evaluation) with one that fails the test, so an error that came after loading would show.
"""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from gnr_fast import cli
from gnr_fast.cli import main
from gnr_fast.errors import InputError
from gnr_fast.inversion import FORMAT, FORMAT_VERSION, Inversion

UNWRITABLE = "/proc/gnr-fast-test/out"  # /proc refuses new files, even to root


@pytest.fixture
def image_file(sample_image, tmp_path):
    path = tmp_path / "in.png"
    sample_image.save(path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the error must come before it."""

    def refuse(args):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(cli, "_editor", refuse)


def _one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gnr-fast: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _unwritable_paths(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    return {
        "virtual-fs": (UNWRITABLE + ".x", "cannot be written"),
        "parent-is-a-file": (str(blocker / "out.x"), "cannot be written"),
        "is-a-folder": (str(folder), "is a folder"),
    }


KINDS = ["virtual-fs", "parent-is-a-file", "is-a-folder"]


# --- invert ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_invert_unwritable_output_fails_before_loading(image_file, tmp_path, capsys, no_model, kind):
    out, message = _unwritable_paths(tmp_path)[kind]
    assert main(["invert", str(image_file), "-s", "a red circle", "-o", out, "--quiet"]) == 2
    _one_line_error(capsys, "-o/--out", message)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["invert", "missing.png", "-s", "a", "-o", "{tmp}/x.inv"], "does not exist"),
        (["invert", "{img}", "-s", "", "-o", "{tmp}/x.inv"], "source_prompt is empty"),
    ],
)
def test_invert_user_errors_before_loading(image_file, tmp_path, capsys, no_model, argv, message):
    argv = [a.replace("{img}", str(image_file)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv + ["--quiet"]) == 2
    _one_line_error(capsys, message)


def test_invert_bad_step_count(tiny_model_path, image_file, tmp_path, capsys):
    argv = ["invert", str(image_file), "-s", "a", "-o", str(tmp_path / "x.inv"), "--steps", "0"]
    assert main(argv + ["--model", str(tiny_model_path), "--quiet"]) == 2
    _one_line_error(capsys, "num_steps")


def test_invert_save_failure_is_one_line(tiny_model_path, image_file, tmp_path, capsys, monkeypatch):
    """A write that fails after the check (disk full, a race) still ends in one line, not a traceback."""
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull,\n message: ... })")

    monkeypatch.setattr("gnr_fast.inversion.save_file", full_disk)
    argv = ["invert", str(image_file), "-s", "a", "-o", str(tmp_path / "x.inv"), "--steps", "1"]
    assert main(argv + ["--model", str(tiny_model_path), "--quiet"]) == 2
    _one_line_error(capsys, "StorageFull")


# --- edit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_edit_unwritable_output_fails_before_loading(image_file, tmp_path, capsys, no_model, kind):
    out, message = _unwritable_paths(tmp_path)[kind]
    assert main(["edit", str(image_file), "-s", "a", "-t", "b", "-o", out, "--quiet"]) == 2
    _one_line_error(capsys, "-o/--out", message)


def test_edit_default_output_next_to_an_unwritable_input(capsys, no_model, tmp_path, monkeypatch):
    """Without -o the output goes beside the input; an unwritable folder there is found first."""
    monkeypatch.setattr(cli, "_check_before_loading", lambda args: None)  # /proc/... does not exist either
    assert main(["edit", UNWRITABLE + ".png", "-s", "a", "-t", "b", "--quiet"]) == 2
    _one_line_error(capsys, "_edited.png", "cannot be written")


@pytest.fixture(scope="module")
def inversion_file(tiny_editor, tmp_path_factory):
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    inversion = tiny_editor.invert(image, "a grey square", num_steps=2, progress=False)
    return inversion.save(tmp_path_factory.mktemp("inv") / "grey.inv")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-s", "a red circle"], "differs from the inversion's 'a grey square'"),
        (["--steps", "3"], "this inversion has 2 steps but the edit asks for 3"),
    ],
)
def test_edit_inversion_with_mismatching_source_or_steps(tiny_model_path, inversion_file, tmp_path, capsys, extra, message):
    argv = ["edit", "--inversion", str(inversion_file), "-t", "b", "-o", str(tmp_path / "e.png"), *extra]
    assert main(argv + ["--model", str(tiny_model_path), "--quiet"]) == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "e.png").exists()


def test_edit_inversion_of_another_model(tiny_vpred_model_path, inversion_file, tmp_path, capsys):
    argv = ["edit", "--inversion", str(inversion_file), "-t", "b", "-o", str(tmp_path / "e.png")]
    assert main(argv + ["--model", str(tiny_vpred_model_path), "--quiet"]) == 2
    _one_line_error(capsys, "invert the image again")


def test_edit_with_a_bad_inversion_file_fails_before_loading(tmp_path, capsys, no_model):
    path = _write_inversion(tmp_path / "old.inv", version="0")
    assert main(["edit", "--inversion", str(path), "-t", "b", "-o", str(tmp_path / "e.png"), "--quiet"]) == 2
    _one_line_error(capsys, "version '0'", "invert the image again")


def test_edit_image_save_failure_is_one_line(tiny_model_path, image_file, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def denied(self, fp, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(Image.Image, "save", denied)
    argv = ["edit", str(image_file), "-s", "a", "-t", "b", "-o", str(tmp_path / "e.png"), "--steps", "1"]
    assert main(argv + ["--model", str(tiny_model_path), "--quiet"]) == 2
    assert _one_line_error(capsys, "Permission denied") == f"gnr-fast: error: Permission denied: {tmp_path / 'e.png'}"


# --- demo -----------------------------------------------------------------------------------


def test_demo_unwritable_output_fails_before_loading(capsys, no_model):
    assert main(["demo", "-o", UNWRITABLE + ".png", "--quiet"]) == 2
    _one_line_error(capsys, "cannot be written")


# --- client ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["client", "edit", "missing.png", "-s", "a", "-t", "b"], "does not exist"),
        (["client", "edit", "{img}", "-s", "a", "-t", "b", "--config", "nope.yaml"], "does not exist"),
        (["client", "edit", "{img}", "-s", "a", "-t", "b", "--config", "{bad_yaml}"], "not valid YAML"),
        (["client", "edit", "{img}", "-s", "a", "-t", "b", "-o", UNWRITABLE + ".png"], "cannot be written"),
    ],
)
def test_client_errors_before_connecting(image_file, tmp_path, capsys, argv, message, monkeypatch):
    import gnr_fast.client

    monkeypatch.setattr(gnr_fast.client, "GnrClient", None)  # any connection attempt would raise TypeError
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("guiders: [unclosed\n")
    argv = [a.replace("{img}", str(image_file)).replace("{bad_yaml}", str(bad_yaml)) for a in argv]
    assert main(argv) == 2
    _one_line_error(capsys, message)


def test_client_unreachable_server(image_file, tmp_path, capsys):
    argv = ["client", "edit", str(image_file), "-s", "a", "-t", "b", "-o", str(tmp_path / "e.png"),
            "--url", f"127.0.0.1:{_free_port()}", "--timeout", "5"]
    assert main(argv) == 2
    _one_line_error(capsys)
    assert not (tmp_path / "e.png").exists()


def test_client_bad_url(image_file, capsys):
    assert main(["client", "edit", str(image_file), "-s", "a", "-t", "b", "--url", "ftp://x:1"]) == 2
    _one_line_error(capsys, "http://host:port")


# --- export triton-repo ---------------------------------------------------------------------


def test_export_repo_unwritable_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["export", "triton-repo", "--out", UNWRITABLE]) == 2
    _one_line_error(capsys, "No such file or directory")
    assert main(["export", "triton-repo", "--out", str(blocker / "repo")]) == 2
    _one_line_error(capsys, "Not a directory")


# --- eval -----------------------------------------------------------------------------------


@pytest.fixture
def no_evaluation(monkeypatch):
    from gnr_shapes.evaluation import quality

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation ran before the error was found")

    monkeypatch.setattr(quality, "evaluate", refuse)
    monkeypatch.setattr(quality, "evaluate_parallel", refuse)


def test_eval_unwritable_out_fails_before_evaluating(capsys, no_evaluation):
    assert main(["eval", "--out", UNWRITABLE, "--per-kind", "1", "--steps", "1"]) == 2
    _one_line_error(capsys, "--out", "cannot be written")


def test_eval_missing_model(tmp_path, capsys):
    argv = ["eval", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "q"), "--per-kind", "1", "--steps", "1"]
    assert main(argv) == 2
    _one_line_error(capsys, "does not exist")


def test_eval_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--kinds", "no-such-kind"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("gnr-fast eval: error: argument --kinds")


# --- Inversion.load -------------------------------------------------------------------------


def _write_inversion(path, latents=None, **overrides):
    """An inversion file as Inversion.save writes it, with header fields or latents replaced."""
    metadata = {
        "format": FORMAT, "version": FORMAT_VERSION, "source_prompt": "a red circle", "num_steps": "4",
        "model_id": "m", "original_size": "[128, 64]", "working_size": "[128, 64]", "content_hash": "h",
    }
    metadata.update(overrides)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    save_file({"latents": torch.zeros(5, 1, 4, 8, 16) if latents is None else latents}, str(path), metadata=metadata)
    return path


def test_inversion_load_accepts_what_save_writes(tmp_path):
    inversion = Inversion(torch.randn(5, 1, 4, 8, 16), "a red circle", 4, "m", (128, 64), (128, 64), "h")
    loaded = Inversion.load(inversion.save(tmp_path / "ok.inv"))
    assert loaded.working_size == (128, 64) and loaded.num_steps == 4
    torch.testing.assert_close(loaded.latents, inversion.latents)
    assert Inversion.load(_write_inversion(tmp_path / "written.inv")).original_size == (128, 64)


@pytest.mark.parametrize(
    "latents, overrides, message",
    [
        (None, {"version": "2"}, "version '2'"),
        (None, {"version": None}, "version None"),
        (torch.zeros(4, 1, 4, 8, 16), {}, "does not fit"),  # one latent short
        (torch.zeros(5, 2, 4, 8, 16), {}, "does not fit"),  # a batch of two
        (torch.zeros(5, 4, 8, 16), {}, "does not fit"),  # batch dimension missing
        (torch.zeros(5, 1, 4, 8, 8), {}, "does not fit"),  # square latent for a 128x64 image
        (torch.zeros(5, 1, 4, 8, 16), {"working_size": "[130, 64]"}, "is not the working size"),
        (torch.full((5, 1, 4, 8, 16), float("nan")), {}, "not finite"),
        (torch.zeros(5, 1, 4, 6, 8, dtype=torch.int32), {}, "expected F32"),
        (None, {"num_steps": "four"}, "is not a step count"),
        (None, {"num_steps": "0"}, "num_steps '0'"),
        (None, {"working_size": "[64]"}, "working_size '[64]' is not [width, height]"),
        (None, {"original_size": "{"}, "original_size '{' is not [width, height]"),
        (None, {"model_id": None}, "lacks ['model_id']"),
    ],
)
def test_inversion_load_rejects_bad_files(tmp_path, latents, overrides, message):
    path = _write_inversion(tmp_path / "bad.inv", latents, **overrides)
    with pytest.raises(InputError, match="invert") as info:
        Inversion.load(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_options_of_an_argument_group_are_known():
    """`gnr-fast edit`'s consistency options live in an argument group; the parser's own check of
    unknown options must know them (they were refused as 'unrecognized option')."""
    from gnr_fast.cli import build_parser

    args = build_parser().parse_args(["edit", "x.png", "-s", "a", "-t", "b", "--sampler", "consistency",
                                      "--teacher-unet", "t.pt", "--reverse-lora", "r", "--forward-lora", "f"])
    assert (args.sampler, args.teacher_unet, args.reverse_lora, args.forward_lora) == ("consistency", "t.pt", "r", "f")
