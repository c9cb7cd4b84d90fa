"""Smoke tests of the training CLIs: each --smoke run writes a checkpoint and loadable weights,
resumes from it, and the exported folder loads with plain diffusers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gnr_fast.model_files import BUNDLED_MODEL
from gnr_shapes.training import export, judge, tokenizer, unet, vae


def _synthetic_bpe(path: Path) -> Path:
    """A merges file of CLIP's size made of pairs of byte symbols (no download needed)."""
    symbols = tokenizer.byte_symbols()
    pairs = [(a, b) for a in symbols for b in symbols][: tokenizer.N_MERGES]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("#version: synthetic\n" + "\n".join(f"{a} {b}" for a, b in pairs) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    tokenizer.build_tokenizer(_synthetic_bpe(root / "bpe.txt.gz"), root / "tokenizer")
    return root / "tokenizer"


def test_tokenizer_folder_has_clip_layout(tokenizer_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.model_max_length == 77  # unset, diffusers overflows (toy-model-training.md)
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    ids = tok("ab", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # byte symbols, then their </w> forms
    assert (tokenizer_dir / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_byte_symbols_are_a_printable_bijection() -> None:
    symbols = tokenizer.byte_symbols()
    assert len(set(symbols)) == 256
    assert all(s.isprintable() and not s.isspace() for s in symbols)
    assert symbols[ord("a")] == "a" and symbols[ord(" ")] != " "


def test_real_clip_ids_when_the_model_is_exported() -> None:
    folder = BUNDLED_MODEL / "tokenizer"
    if not folder.exists():
        pytest.skip(f"{folder} not exported yet")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    # Known ids of the real CLIP vocabulary for "a photo of a cat".
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_judge_smoke_writes_loadable_weights(tmp_path: Path) -> None:
    from gnr_shapes.world.judge import load_judge

    judge.main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "judge"), "--smoke"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3
    loaded = load_judge(tmp_path / "judge")
    images = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    assert len(loaded.predict(images)) == 2


def test_offset_noise_adds_one_constant_per_sample_and_channel() -> None:
    plain = unet.training_noise(torch.Size([64, 4, 8, 8]), 0.0, torch.Generator().manual_seed(0))
    offset = unet.training_noise(torch.Size([64, 4, 8, 8]), 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(plain, unet.training_noise(torch.Size([64, 4, 8, 8]), 0.0, torch.Generator().manual_seed(0)))
    shift = offset - plain  # the same base draw comes first, so the difference is the offset alone
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    # 256 draws of 0.5 * N(0, 1): their std is 0.5 within sampling error (~0.02).
    assert 0.4 < float(shift[:, :, 0, 0].std()) < 0.6


@pytest.mark.slow
def test_vae_unet_export_chain(tmp_path: Path, tokenizer_dir: Path) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae.main(["--out", str(tmp_path / "vae"), "--smoke"])
    assert torch.load(tmp_path / "vae" / "checkpoint.pt", weights_only=False)["step"] == 3
    loaded_vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "final")
    assert loaded_vae.config.scaling_factor != 0.18215  # measured, not SD's default

    vae.main(["--out", str(tmp_path / "vae"), "--smoke", "--resume"])
    assert "start step=3" in (tmp_path / "vae" / "train.log").read_text()

    vae.main(["--out", str(tmp_path / "dec"), "--smoke", "--decoder-only",
              "--init", str(tmp_path / "vae" / "final")])
    tuned = AutoencoderKL.from_pretrained(tmp_path / "dec" / "final").state_dict()
    before = loaded_vae.state_dict()
    assert all(torch.equal(before[k], tuned[k]) for k in before if k.startswith(("encoder", "quant_conv")))
    assert any(not torch.equal(before[k], tuned[k]) for k in before if k.startswith("decoder"))
    assert AutoencoderKL.from_pretrained(tmp_path / "dec" / "final").config.scaling_factor == (
        loaded_vae.config.scaling_factor)

    unet_args = ["--out", str(tmp_path / "unet"), "--vae", str(tmp_path / "vae" / "final"),
                 "--tokenizer", str(tokenizer_dir), "--smoke"]
    unet.main(unet_args)
    state = torch.load(tmp_path / "unet" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and any(k.startswith("text_encoder.") for k in state["ema"])
    unet.main(unet_args + ["--resume", "--offset-noise", "0.1"])
    assert "start step=3" in (tmp_path / "unet" / "train.log").read_text()

    export.main(["--vae", str(tmp_path / "vae" / "final"), "--unet-run", str(tmp_path / "unet"),
                 "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "model")])
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.clip_sample
    assert pipe.safety_checker is None and pipe.tokenizer.model_max_length == 77
    image = pipe("a small red circle on a blue background", num_inference_steps=2, height=32,
                 width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # The text-encoder-only distillation of issue 18: the UNet stays the --init-model's exactly, the text encoder moves.
    unet.main(["--out", str(tmp_path / "distill"), "--vae", str(tmp_path / "vae" / "final"), "--tokenizer",
               str(tokenizer_dir), "--smoke", "--init-model", str(tmp_path / "model"), "--freeze-unet",
               "--distill", "1", "--relaxed-prob", "0.5"])
    state = torch.load(tmp_path / "distill" / "checkpoint.pt", weights_only=False)
    init_unet = UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet").state_dict()
    init_text = CLIPTextModel.from_pretrained(tmp_path / "model" / "text_encoder").state_dict()
    assert all(torch.equal(state["unet"][k], v) for k, v in init_unet.items())
    assert all(torch.equal(state["ema"][f"unet.{k}"], v) for k, v in init_unet.items())  # and so does its EMA
    assert any(not torch.equal(state["text_encoder"][k], v) for k, v in init_text.items())
    assert "distill_mse=" in (tmp_path / "distill" / "train.log").read_text()
