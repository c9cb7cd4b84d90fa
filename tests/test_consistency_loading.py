"""Loading a consistency model (issue 34): the teacher state dict, the two LoRAs fused once at load,
gnr_fast.json's consistency keys, and a clear ModelLoadError for every bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gnr_fast.consistency_models import ConsistencyFiles, load_consistency_unets, load_guidance_unet, read_state_dict
from gnr_fast.errors import ConfigError, CorruptCheckpointError, ModelLoadError, ModelNotFoundError
from gnr_fast.lora import PEFT_PREFIX, fuse_lora, read_lora
from gnr_fast.model_defaults import load_model_defaults
from tests.consistency_model import TINY_ICD_METADATA, consistency_model_dir


@pytest.fixture(scope="module")
def icd(golden_dir):
    return golden_dir / "tiny-icd"


@pytest.fixture(scope="module")
def unet_config(icd):
    return json.loads((icd / "unet" / "config.json").read_text())


@pytest.fixture(scope="module")
def files(icd):
    return ConsistencyFiles(icd / "teacher.pt", icd / "reverse_lora.safetensors", icd / "forward_lora.safetensors")


def test_fused_unets_match_the_authors_loader(unet_config, files, golden_dir):
    """W + (8/r)·(fp16(B) @ fp16(A)) in float32 is what their diffusers+peft loading produced:
    measured max |Δ| = 0 on every parameter of both UNets (bound 0: the formula is exact)."""
    unets = load_consistency_unets(unet_config, files)
    golden = torch.load(golden_dir / "consistency_scene0" / "fused_unets.pt", weights_only=True)
    for name in ("reverse", "forward"):
        ours, theirs = getattr(unets, name).state_dict(), golden[name]
        assert set(ours) == set(theirs)
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
        assert worst == 0.0, f"{name}: max |Δ| {worst}"
    assert unets.guidance_embedding_dim == 512
    teacher = read_state_dict(files.teacher_unet)
    changed = [k for k, v in unets.reverse.state_dict().items() if not torch.equal(v, teacher[k])]
    assert len(changed) == len(read_lora(files.reverse_lora))  # only the targeted weights move (277 modules)


def test_missing_files_are_model_not_found(unet_config, files, tmp_path):
    for field in ("teacher_unet", "reverse_lora", "forward_lora"):
        bad = ConsistencyFiles(**{**files.__dict__, field: tmp_path / "absent.bin"})
        with pytest.raises(ModelNotFoundError, match="absent.bin"):
            load_consistency_unets(unet_config, bad)


def test_teacher_must_be_a_plain_state_dict(unet_config, tmp_path):
    module_file = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module_file)  # a pickled module: refused by weights_only
    with pytest.raises(CorruptCheckpointError, match="weights_only"):
        load_guidance_unet(unet_config, module_file)
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "step": 3}, nested)
    with pytest.raises(CorruptCheckpointError, match="flat"):
        load_guidance_unet(unet_config, nested)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(CorruptCheckpointError):
        load_guidance_unet(unet_config, garbage)


def test_teacher_without_guidance_embedding(unet_config, files, tmp_path):
    state = read_state_dict(files.teacher_unet)
    del state["time_embedding.cond_proj.weight"]
    path = tmp_path / "plain_unet.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="time_cond_proj_dim"):
        load_guidance_unet(unet_config, path)


def test_teacher_of_another_architecture(unet_config, files, tmp_path):
    state = read_state_dict(files.teacher_unet)
    state["conv_in.weight"] = torch.zeros(8, 4, 5, 5)
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_guidance_unet(unet_config, path)


def _write_lora(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_lora_for_another_architecture(unet_config, files, tmp_path):
    teacher = load_guidance_unet(unet_config, files.teacher_unet)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    tensors = load_file(str(files.reverse_lora))
    key = next(k for k in tensors if k.endswith("attn1.to_q.lora_A.weight"))
    wide = dict(tensors, **{key: torch.zeros(4, 320)})  # in_features of SD 1.5, not of this UNet
    with pytest.raises(ModelLoadError, match="another architecture"):
        fuse_lora(teacher, read_lora(_write_lora(wide, tmp_path / "wide.safetensors")))
    renamed = dict(tensors)
    renamed[PEFT_PREFIX + "down_blocks.9.resnets.0.conv1.lora_A.weight"] = torch.zeros(4, 8, 3, 3)
    renamed[PEFT_PREFIX + "down_blocks.9.resnets.0.conv1.lora_B.weight"] = torch.zeros(8, 4, 1, 1)
    with pytest.raises(ModelLoadError, match="down_blocks.9"):
        fuse_lora(teacher, read_lora(_write_lora(renamed, tmp_path / "renamed.safetensors")))
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # checked before any change


def test_lora_rank_mismatch_and_layout(files, tmp_path):
    tensors = load_file(str(files.reverse_lora))
    key = next(k for k in tensors if k.endswith(".lora_B.weight") and tensors[k].dim() == 2)
    short = dict(tensors, **{key: tensors[key][:, :3]})
    with pytest.raises(ModelLoadError, match="rank mismatch"):
        read_lora(_write_lora(short, tmp_path / "short.safetensors"))
    kohya = {k.replace(PEFT_PREFIX, "lora_unet_"): v for k, v in tensors.items()}
    with pytest.raises(ModelLoadError, match="PEFT"):
        read_lora(_write_lora(kohya, tmp_path / "kohya.safetensors"))
    half = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(ModelLoadError, match="only its lora_A"):
        read_lora(_write_lora(half, tmp_path / "half.safetensors"))
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(CorruptCheckpointError):
        read_lora(tmp_path / "text.safetensors")


def test_gnr_fast_json_consistency_keys(golden_dir, tmp_path):
    folder = consistency_model_dir(golden_dir, tmp_path / "model")
    defaults = load_model_defaults(folder)
    assert defaults.sampler == "consistency" and defaults.preset == "consistency"
    assert defaults.consistency.teacher_unet == folder / "teacher.pt"
    assert defaults.consistency.lora_alpha == 8.0 and defaults.consistency.timesteps == (259, 519, 779, 999)
    cases = [
        ({"sampler": "consistency"}, "go together"),
        ({"sampler": "euler"}, "'sampler' must be one of"),
        ({"consistency": {**TINY_ICD_METADATA["consistency"], "extra": 1}}, "unknown key"),
        ({"consistency": {**TINY_ICD_METADATA["consistency"], "teacher_unet": "../teacher.pt"}}, "inside the model"),
        ({"consistency": {**TINY_ICD_METADATA["consistency"], "timesteps": [999, 259]}}, "ascending"),
        ({"consistency": {**TINY_ICD_METADATA["consistency"], "lora_alpha": 0}}, "positive"),
    ]
    for change, message in cases:
        metadata = {**TINY_ICD_METADATA, **change}
        if change.get("sampler") == "consistency":
            metadata.pop("consistency")
        (folder / "gnr_fast.json").write_text(json.dumps(metadata))
        with pytest.raises(ModelLoadError, match=message):
            load_model_defaults(folder)
    (folder / "gnr_fast.json").write_text(json.dumps({**TINY_ICD_METADATA, "preset": "fast"}))
    with pytest.raises(ConfigError, match="consistency"):
        load_model_defaults(folder)


def test_ddim_folder_keeps_its_defaults(golden_dir, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(golden_dir / "tiny-sd", folder, symlinks=True)
    defaults = load_model_defaults(folder)
    assert defaults.sampler == "ddim" and defaults.consistency is None
