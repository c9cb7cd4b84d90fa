"""TensorRT engines for the plain calls: what can be checked without TensorRT here (profiles from
the edit plans, cache keys, records and their refusals, clear errors), and the engine itself
where TensorRT and a GPU exist (skipped otherwise, naming what is missing)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gnr_fast.config import PRESET_NAMES, EditConfig
from gnr_fast.errors import BackendUnavailableError, ExportError, ExportMismatchError
from gnr_fast.runtime.export_info import ExportInfo
from gnr_fast.runtime.tensorrt.engine import (
    EngineProfile,
    EngineRecord,
    engine_cache_key,
    plain_row_counts,
    profiles_from_plans,
    tensorrt_available,
)

INFO = ExportInfo(
    unet_id="u1", dtype="float32", latent_sizes=((64, 64), (32, 32)), min_batch=1, max_batch=4, in_channels=4,
    out_channels=4, context_len=77, context_dim=768, exporter="torchscript", opset=18, gnr_fast_version="0.1.0",
)


def test_row_counts_follow_the_plans():
    # nonstyle: ε_u + ε_trg in one plain call every step (the guided rows are capturing/grad calls);
    # style: ε_trg comes from the grad call while the features guider reads cur_trg (25 steps).
    assert plain_row_counts([EditConfig.preset("nonstyle", 50)]) == {1: 50, 2: 100}
    assert plain_row_counts([EditConfig.preset("style", 50)]) == {1: 50 + 50, 2: 50}


def test_profiles_cover_every_size_and_the_planned_rows():
    profiles = profiles_from_plans(INFO, [EditConfig.preset(n, 50) for n in PRESET_NAMES])
    assert [p.latent_size for p in profiles] == [(64, 64), (32, 32)]
    assert {(p.min_batch, p.opt_batch, p.max_batch) for p in profiles} == {(1, 2, 2)}
    served = profiles_from_plans(INFO, [EditConfig.preset("nonstyle", 50)], edits_per_call=2)
    assert (served[0].min_batch, served[0].opt_batch, served[0].max_batch) == (1, 4, 4)
    with pytest.raises(ExportError, match="up to 6 rows .* at most 4; export again with --max-batch 6"):
        profiles_from_plans(INFO, [EditConfig.preset("nonstyle", 50)], edits_per_call=3)


def test_profile_shapes_name_every_input():
    shapes = EngineProfile((64, 48), 1, 2, 4).shapes(INFO)
    assert shapes == {
        "sample": ((1, 4, 64, 48), (2, 4, 64, 48), (4, 4, 64, 48)),
        "timestep": ((1,), (2,), (4,)),
        "context": ((1, 77, 768), (2, 77, 768), (4, 77, 768)),
    }


def test_engine_cache_key_changes_with_every_input():
    profiles = (EngineProfile((64, 64), 1, 2, 2),)
    key = engine_cache_key(INFO, profiles, False, "10.9", "NVIDIA A100")
    assert key == engine_cache_key(INFO, profiles, False, "10.9", "NVIDIA A100")
    others = {
        engine_cache_key(INFO, profiles, True, "10.9", "NVIDIA A100"),
        engine_cache_key(INFO, profiles, False, "10.10", "NVIDIA A100"),
        engine_cache_key(INFO, profiles, False, "10.9", "NVIDIA H100"),
        engine_cache_key(INFO, (EngineProfile((64, 64), 1, 2, 4),), False, "10.9", "NVIDIA A100"),
        engine_cache_key(dataclasses.replace(INFO, unet_id="u2"), profiles, False, "10.9", "NVIDIA A100"),
    }
    assert key not in others and len(others) == 5


def record(tmp_path) -> EngineRecord:
    profiles = (EngineProfile((64, 64), 1, 2, 2), EngineProfile((32, 32), 1, 2, 4))
    return EngineRecord(export=INFO, profiles=profiles, fp16=True, tensorrt_version="10.9", device_name="NVIDIA A100",
                        key="k", path=str(tmp_path / "unet.engine"))


def test_record_round_trip_and_refusals(tmp_path):
    rec = record(tmp_path)
    rec.write()
    back = EngineRecord.read(tmp_path / "unet.engine")
    assert back == rec
    back.check("u1", "10.9", "NVIDIA A100")
    with pytest.raises(ExportMismatchError, match="made from UNet u1, but the loaded UNet is u2"):
        back.check("u2", "10.9", "NVIDIA A100")
    with pytest.raises(ExportMismatchError, match="built with TensorRT 10.9, this is 10.10"):
        back.check("u1", "10.10", "NVIDIA A100")
    with pytest.raises(ExportMismatchError, match="built for 'NVIDIA A100', this GPU is 'NVIDIA L4'"):
        back.check("u1", "10.9", "NVIDIA L4")


def test_profile_lookup(tmp_path):
    rec = record(tmp_path)
    assert rec.profile_for(2, (64, 64)) == 0
    assert rec.profile_for(3, (32, 32)) == 1
    with pytest.raises(ExportMismatchError, match="no profile for 3 rows at latent size \\(64, 64\\)"):
        rec.profile_for(3, (64, 64))
    with pytest.raises(ExportMismatchError, match="no profile for 1 rows at latent size \\(48, 48\\)"):
        rec.profile_for(1, (48, 48))


def test_missing_and_old_records_are_refused(tmp_path):
    with pytest.raises(ExportError, match="is not an engine built by `gnr-fast export tensorrt`"):
        EngineRecord.read(tmp_path / "none.engine")
    path = record(tmp_path).write()
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 0}))
    with pytest.raises(ExportMismatchError, match="engine record format 0"):
        EngineRecord.read(tmp_path / "unet.engine")


@pytest.mark.skipif(tensorrt_available() and torch.cuda.is_available(), reason="TensorRT and CUDA are present")
def test_without_tensorrt_the_error_names_what_is_missing(tmp_path, capsys):
    from gnr_fast.cli import main
    from gnr_fast.runtime.tensorrt.engine import build_engine
    from gnr_fast.runtime.tensorrt.runner import TensorRTPlainUNet

    with pytest.raises(BackendUnavailableError, match="TensorRT 10 is not installed: pip install tensorrt|no CUDA device"):
        build_engine(tmp_path, tmp_path / "e.engine")
    with pytest.raises(BackendUnavailableError, match="runtime 'tensorrt' is unavailable"):
        TensorRTPlainUNet(tmp_path / "e.engine", "u1")
    assert main(["export", "tensorrt", "--onnx", str(tmp_path), "--out", str(tmp_path / "e.engine")]) == 2
    assert "gnr-fast export tensorrt is unavailable" in capsys.readouterr().err


MISSING = [what for what, present in (("tensorrt is not installed (pip install tensorrt-cu12, NVIDIA's index)",
                                      tensorrt_available()), ("no CUDA device", torch.cuda.is_available())) if not present]


@pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING))
def test_engine_matches_eager(tiny_model_path, tmp_path):
    from gnr_fast.runtime.onnx.export import export_onnx
    from gnr_fast.fingerprint import unet_fingerprint
    from gnr_fast.runtime.tensorrt.engine import build_engine
    from gnr_fast.loading import load_components
    from gnr_fast.runtime.tensorrt.runner import TensorRTPlainUNet

    components = load_components(tiny_model_path, device="cuda")
    export_onnx(components, tmp_path / "onnx", sizes=((64, 64),))
    build_engine(tmp_path / "onnx", tmp_path / "unet.engine")
    runner = TensorRTPlainUNet(tmp_path / "unet.engine", unet_fingerprint(components.unet))
    latents, context = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(2, 77, 16, device="cuda")
    eps = runner(latents, torch.tensor(500, device="cuda"), context)
    with torch.no_grad():
        ref = components.unet(latents, torch.tensor(500, device="cuda"), encoder_hidden_states=context).sample
    assert ((eps - ref).norm() / ref.norm()).item() < 1e-3  # TF32 may be on for TensorRT's float32 kernels


def test_a_unet_with_extra_inputs_is_refused():
    """The engine runner binds sample, timestep and context only: a consistency (guidance-embedding)
    UNet is refused by the backend's factory, naming its extra input, before any engine is read."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from gnr_fast.runtime.tensorrt.runner import tensorrt_plain_runner

    unet = UNet2DConditionModel(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8, sample_size=8,
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                cross_attention_dim=8, time_cond_proj_dim=16)
    with pytest.raises(BackendUnavailableError, match="timestep_cond"):
        tensorrt_plain_runner(unet, SimpleNamespace(tensorrt_engine="engine.plan"))
