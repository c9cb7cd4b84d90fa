"""Single-file checkpoints (LDM layout) load offline and edit exactly as their diffusers folders do; bad files fail clearly."""

from __future__ import annotations

import logging

import pytest
import torch
from single_file_checkpoints import ldm_state_dict, write_single_file
from tiny_pipeline import build_tiny_pipeline

from gnr_fast import Editor
from gnr_fast.checkpoints import convert_single_file, load_single_file
from gnr_fast.checkpoints.families import (
    SD1,
    SD2_768,
    SD2_BASE,
    choose_prediction_type,
    detect,
)
from gnr_fast.checkpoints.single_file import expected_tensors
from gnr_fast.cli import main
from gnr_fast.errors import (
    ConfigError,
    CorruptCheckpointError,
    MissingComponentError,
    ModelLoadError,
    NotACheckpointError,
    NotAPipelineError,
    UnsupportedArchitectureError,
)

STEPS = 3


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    """The SD 2.x-style tiny pipeline: linear projections, OpenCLIP-style text encoder, '!' padding, v-prediction."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"), seed=2, prediction_type="v_prediction", family="sd2")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_path, tiny_vpred_model_path, sd2_folder):
    """name → (single file, its folder): ε as .safetensors, v (SD 1.x layout) as .ckpt, SD 2.x-style as .safetensors."""
    root = tmp_path_factory.mktemp("single-files")
    return {
        "sd1-eps": (write_single_file(tiny_model_path, root / "sd1.safetensors"), tiny_model_path),
        "sd1-v": (write_single_file(tiny_vpred_model_path, root / "sd1-v.ckpt"), tiny_vpred_model_path),
        "sd2-v": (write_single_file(sd2_folder, root / "sd2-v.safetensors", layout="open_clip"), sd2_folder),
    }


@pytest.fixture
def sd1_tensors(tiny_model_path):
    return ldm_state_dict(tiny_model_path)


def _image():
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:64, :64]
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[...] = (30, 60, 200)
    rgb[(yy - 32) ** 2 + (xx - 30) ** 2 < 225] = (220, 30, 30)
    return Image.fromarray(rgb)


def _edit(editor):
    return editor.edit(_image(), "a green circle", source_prompt="a red circle", num_steps=STEPS, progress=False)


# --- the layout: our LDM names are exactly what diffusers' conversion reads ------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ldm_layout_round_trips_through_diffusers_conversion(tiny_model_path, sd2_folder, family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextModel

    folder = tiny_model_path if family == "sd1" else sd2_folder
    tensors = ldm_state_dict(folder, "clip" if family == "sd1" else "open_clip")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    text = convert_ldm_clip_checkpoint(tensors) if family == "sd1" else convert_open_clip_checkpoint(text_encoder, tensors)
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    for module, converted in (
        (unet, convert_ldm_unet_checkpoint(tensors, unet.config)),
        (vae, convert_ldm_vae_checkpoint(tensors, vae.config)),
        (text_encoder, text),
    ):
        reference = dict(module.named_parameters())
        assert set(reference) <= set(converted)
        for name, parameter in reference.items():
            assert torch.equal(converted[name], parameter), name


# --- loading and editing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1-eps", "sd1-v", "sd2-v"])
def test_single_file_edit_equals_folder_edit(files, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, folder = files[name]
    from_file = Editor.from_pretrained(path, config=folder)
    from_folder = Editor.from_pretrained(folder)
    assert from_file.components.schedule.prediction_type == from_folder.components.schedule.prediction_type
    assert from_file.model_id == from_folder.model_id  # inversions saved with one are valid for the other
    a, b = _edit(from_file), _edit(from_folder)
    assert torch.isfinite(a.latents).all() and a.image.size == (64, 64)
    # Measured 0 (identical weights, same computation); 1e-6 relative per the issue.
    assert (a.latents - b.latents).norm() <= 1e-6 * b.latents.norm()


def test_sd2_style_pipeline_edits_end_to_end(files, sd2_folder):
    # test_single_file_edit_equals_folder_edit[sd2-v] edits it from the folder and the file; here: the SD 2.x
    # parts are what loading promised, and the fast path equals the paper-literal reference on this architecture
    path, _ = files["sd2-v"]
    editor = Editor.from_pretrained(path, config=sd2_folder)
    components = editor.components
    assert components.schedule.prediction_type == "v_prediction"
    assert components.unet.config.use_linear_projection and components.unet.config.cross_attention_dim == 32
    assert components.tokenizer.pad_token == "!"
    assert editor.embed("a red circle").shape == (1, 77, 32)
    inversion = editor.invert(_image(), "a red circle", num_steps=2, progress=False)
    fast = editor.edit(inversion, "a green circle", mode="fast", progress=False)
    reference = editor.edit(inversion, "a green circle", mode="reference", progress=False)
    assert torch.isfinite(fast.latents).all() and fast.image.size == (64, 64)
    # measured 3.2e-6 relative (fast and reference order their float sums differently); tolerance 10x
    assert (fast.latents - reference.latents).norm() <= 3e-5 * reference.latents.norm()


def test_prediction_type_overrides(files):
    path, folder = files["sd1-eps"]
    components = Editor.from_pretrained(path, config=folder, prediction_type="v_prediction").components
    assert components.schedule.prediction_type == "v_prediction"
    assert Editor.from_pretrained(folder, prediction_type="v_prediction").components.schedule.prediction_type == (
        "v_prediction"
    )


def test_half_precision_files_upcast(files, tmp_path):
    _, folder = files["sd1-eps"]
    reference = load_single_file(files["sd1-eps"][0], torch.float32, config=folder)
    for dtype in (torch.float16, torch.bfloat16):
        path = write_single_file(folder, tmp_path / f"{dtype}.safetensors", dtype=dtype)
        modules = load_single_file(path, torch.float32, config=folder)
        for module, ref in ((modules.unet, reference.unet), (modules.vae, reference.vae), (modules.text_encoder, reference.text_encoder)):
            for (name, p), q in zip(module.named_parameters(), ref.parameters()):
                assert p.dtype == torch.float32, name
                assert torch.equal(p, q.to(dtype).float()), name  # the stored values, upcast exactly
        assert load_single_file(path, None, config=folder).unet.dtype == dtype  # None keeps the file's dtype


def test_convert_writes_an_equivalent_folder(files, tmp_path):
    path, folder = files["sd2-v"]
    out = convert_single_file(path, tmp_path / "converted", config=folder)
    converted, original = Editor.from_pretrained(out), Editor.from_pretrained(path, config=folder)
    assert converted.model_id == original.model_id
    assert converted.components.tokenizer.pad_token == "!"
    assert converted.components.schedule.prediction_type == "v_prediction"
    for p, q in zip(converted.components.unet.parameters(), original.components.unet.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ModelLoadError, match="not empty"):
        convert_single_file(path, out, config=folder)


def test_convert_cli(files, tmp_path, capsys):
    path, folder = files["sd1-v"]
    out = tmp_path / "cli-out"
    assert main(["convert", str(path), "--out", str(out), "--model-config", str(folder), "--dtype", "float16"]) == 0
    assert "wrote diffusers pipeline folder" in capsys.readouterr().out
    editor = Editor.from_pretrained(out)
    assert editor.components.schedule.prediction_type == "v_prediction"
    assert main(["convert", str(path), "--out", str(out), "--model-config", str(folder)]) == 2
    assert "--force" in capsys.readouterr().err


# --- family detection and the prediction-type rules (real SD shapes, tiny tensors) --------------------------


def _real_layout(sd2: bool) -> dict[str, torch.Tensor]:
    """The keys detection reads, with the shapes of the real SD 1.5 / SD 2.1 files."""
    width = 1024 if sd2 else 768
    text = "cond_stage_model.model.token_embedding.weight" if sd2 else (
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    )
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.empty((320, 320) if sd2 else (320, 320, 1, 1)),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(320, width),
        "first_stage_model.encoder.conv_in.weight": torch.empty(128, 3, 3, 3),
        text: torch.empty(1, width),
    }


def test_detects_sd1_and_sd2(tmp_path, caplog):
    sd1 = detect(_real_layout(False), tmp_path / "v1-5-pruned-emaonly.safetensors")
    sd2 = detect(_real_layout(True), tmp_path / "v2-1_768-ema-pruned.safetensors")
    assert (sd1.generation, sd1.context_width, sd1.linear_projection) == ("sd1", 768, False)
    assert (sd2.generation, sd2.context_width, sd2.linear_projection) == ("sd2", 1024, True)
    with caplog.at_level(logging.WARNING):
        assert choose_prediction_type(sd1, tmp_path / "x.safetensors", None, None) == "epsilon"
    assert not caplog.records  # SD 1.x: a documented default, not a guess
    with caplog.at_level(logging.WARNING):
        assert choose_prediction_type(sd2, tmp_path / "v2-1_768-ema-pruned.safetensors", None, None) == "v_prediction"
        assert choose_prediction_type(sd2, tmp_path / "v2-1_512-ema-pruned.safetensors", None, None) == "epsilon"
        assert choose_prediction_type(sd2, tmp_path / "512-base-ema.ckpt", None, None) == "epsilon"
    assert len(caplog.records) == 3 and all("--prediction-type" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert choose_prediction_type(sd2, tmp_path / "a.safetensors", "epsilon", None) == "epsilon"
        marked = detect({**_real_layout(True), "v_pred": torch.empty(0)}, tmp_path / "ft.safetensors")
        assert choose_prediction_type(marked, tmp_path / "ft.safetensors", None, None) == "v_prediction"
        assert choose_prediction_type(sd2, tmp_path / "b.safetensors", None, "epsilon") == "epsilon"
    assert not caplog.records


@pytest.mark.parametrize("family", [SD1, SD2_BASE, SD2_768])
def test_shipped_configs_are_the_released_architectures(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(family.config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(family.config_dir / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(family.config_dir / "text_encoder"))
    count = lambda module: sum(p.numel() for p in module.parameters())
    # parameter counts of the released SD 1.5 / SD 2.1 diffusers components
    sd2 = family is not SD1
    assert count(unet) == (865_910_724 if sd2 else 859_520_964)
    assert count(vae) == 83_653_863
    assert count(text) == (340_387_840 if sd2 else 123_060_480)
    expected = expected_tensors(family.config_dir, family.text_layout)
    # keys (and shapes) that the released files hold, as diffusers' own detection names them
    if sd2:
        assert expected["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
        assert expected["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"] == (3072, 1024)
        assert expected["cond_stage_model.model.positional_embedding"] == (77, 1024)
        assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" not in expected  # unused last layer
    else:
        assert expected["model.diffusion_model.output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
        assert expected["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"] == (77, 768)
    assert expected["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert expected["first_stage_model.decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert expected["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert expected["model.diffusion_model.output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert expected["model.diffusion_model.time_embed.0.weight"] == (1280, 320)


# --- every bad file gives its error ------------------------------------------------------------------------------


def _save(tmp_path, tensors, name="bad.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_sdxl_rejected(tmp_path, sd1_tensors, tiny_model_path):
    path = _save(tmp_path, {**sd1_tensors, "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)})
    with pytest.raises(UnsupportedArchitectureError, match="SDXL"):
        Editor.from_pretrained(path, config=tiny_model_path)
    path = _save(tmp_path, {**sd1_tensors, "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 8)})
    with pytest.raises(UnsupportedArchitectureError, match="class-conditioned"):
        Editor.from_pretrained(path, config=tiny_model_path)


@pytest.mark.parametrize("channels, match", [(9, "inpainting"), (5, "5 input channels")])
def test_inpainting_and_other_unets_rejected(tmp_path, sd1_tensors, channels, match):
    conv = sd1_tensors["model.diffusion_model.input_blocks.0.0.weight"]
    tensors = {**sd1_tensors, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(conv.shape[0], channels, 3, 3)}
    with pytest.raises(UnsupportedArchitectureError, match=match):
        Editor.from_pretrained(_save(tmp_path, tensors))


def test_other_layout_rejected(tmp_path):
    path = _save(tmp_path, {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4, 4)})
    with pytest.raises(UnsupportedArchitectureError, match="another layout"):
        Editor.from_pretrained(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(files, tmp_path, suffix):
    source = files["sd1-eps" if suffix == ".safetensors" else "sd1-v"][0]
    data = source.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt") as info:
        Editor.from_pretrained(path)
    assert str(path) in str(info.value)


def test_not_a_checkpoint(tmp_path, sd1_tensors):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not weights\n" * 20)
    with pytest.raises(NotACheckpointError, match="no safetensors header"):
        Editor.from_pretrained(text)
    renamed = tmp_path / "photo.ckpt"
    renamed.write_bytes(b"\xff\xd8\xff\xe0 a jpeg")
    with pytest.raises(NotACheckpointError, match="neither a torch.save"):
        Editor.from_pretrained(renamed)
    lora = _save(tmp_path, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(NotACheckpointError, match="no UNet weights"):
        Editor.from_pretrained(lora)
    unet_only = _save(tmp_path, {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3)})
    with pytest.raises(NotACheckpointError, match="one diffusers component"):
        Editor.from_pretrained(unet_only)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(NotACheckpointError, match="holds a Tensor"):
        Editor.from_pretrained(tensor)
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\x08\x07")
    with pytest.raises(NotAPipelineError, match="unknown kind"):
        Editor.from_pretrained(other)


class _Callback:  # stands for the Lightning objects full training checkpoints pickle
    pass


def test_pickled_objects_never_loaded(tmp_path, sd1_tensors):
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": sd1_tensors, "callbacks": _Callback()}, path)
    with pytest.raises(CorruptCheckpointError, match="weights_only=True"):
        Editor.from_pretrained(path)


def test_missing_keys(tmp_path, sd1_tensors, tiny_model_path):
    key = "first_stage_model.decoder.up.0.block.1.conv2.weight"
    path = _save(tmp_path, {k: v for k, v in sd1_tensors.items() if k != key})
    with pytest.raises(MissingComponentError, match=key.replace(".", r"\.")):
        Editor.from_pretrained(path, config=tiny_model_path)
    no_text = _save(tmp_path, {k: v for k, v in sd1_tensors.items() if not k.startswith("cond_stage_model.")}, "t.safetensors")
    with pytest.raises(MissingComponentError, match="no text encoder"):
        Editor.from_pretrained(no_text, config=tiny_model_path)
    no_vae = _save(tmp_path, {k: v for k, v in sd1_tensors.items() if not k.startswith("first_stage_model.")}, "v.safetensors")
    with pytest.raises(MissingComponentError, match="no VAE"):
        Editor.from_pretrained(no_vae, config=tiny_model_path)


def test_architecture_mismatch_asks_for_model_config(files):
    path, _ = files["sd1-eps"]  # tiny widths do not fit the shipped SD 1.x configs
    with pytest.raises(UnsupportedArchitectureError, match="--model-config") as info:
        Editor.from_pretrained(path)
    assert "SD 1.x" in str(info.value)


def test_bad_options(files, tiny_model_path, tmp_path):
    path, folder = files["sd1-eps"]
    with pytest.raises(ConfigError, match="prediction_type='x'"):
        Editor.from_pretrained(path, prediction_type="x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        Editor.from_pretrained(path, config=tmp_path / "nope")
    with pytest.raises(MissingComponentError, match="unet/config.json"):
        Editor.from_pretrained(path, config=tmp_path)
    with pytest.raises(ModelLoadError, match="single-file checkpoints only"):
        Editor.from_pretrained(tiny_model_path, config=folder)


def test_cli_reports_bad_file(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 3)
    assert main(["invert", str(path), "-s", "x", "-o", str(tmp_path / "x.inv")]) == 2
    assert "gnr-fast: error:" in capsys.readouterr().err


def test_model_config_without_tokenizer_or_scheduler(files, tmp_path, caplog):
    import shutil

    path, folder = files["sd2-v"]
    for part in ("unet", "vae", "text_encoder"):
        (tmp_path / part).mkdir()
        shutil.copy(folder / part / "config.json", tmp_path / part / "config.json")
    with caplog.at_level(logging.WARNING):
        modules = load_single_file(path, torch.float32, config=tmp_path)
    assert modules.tokenizer.pad_token == "!"  # the detected family's (SD 2.x) tokenizer settings
    assert modules.scheduler_config["prediction_type"] == "v_prediction"  # SD 2.x guess: no 512/base in the name
    assert any("guessing" in r.getMessage() for r in caplog.records)


def test_convert_bad_paths(tmp_path):
    from gnr_fast.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        convert_single_file(tmp_path / "missing.safetensors", tmp_path / "out")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(NotACheckpointError, match="not named like"):
        convert_single_file(other, tmp_path / "out")


def test_clip_without_text_model_level(files, tmp_path, sd1_tensors, tiny_model_path):
    # older tools wrote cond_stage_model.transformer.embeddings.* (no text_model. level)
    old_style = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                 for k, v in sd1_tensors.items()}
    modules = load_single_file(_save(tmp_path, old_style), torch.float32, config=tiny_model_path)
    reference = load_single_file(files["sd1-eps"][0], torch.float32, config=tiny_model_path)
    for p, q in zip(modules.text_encoder.parameters(), reference.text_encoder.parameters()):
        assert torch.equal(p, q)
