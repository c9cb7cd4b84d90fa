"""Consistency distillation of the bundled model (issue 35): the guidance-distilled teacher, the
LoRA adapters in the authors' file layout, the iCD jumps, boundaries and preservation loss, --smoke
runs of the three training CLIs (teacher, iCD, cycle fine-tune) whose outputs load through the
engine's consistency loader, and the export into a model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from gnr_fast.consistency_models import ConsistencyFiles, load_consistency_unets
from gnr_fast.lora import PEFT_PREFIX, fuse_lora, read_lora
from gnr_fast.model_files import BUNDLED_MODEL
from gnr_shapes.training import consistency, cycle_finetune, guidance_teacher
from gnr_shapes.training.lora_adapters import attach_lora, save_lora_file
from gnr_shapes.training.unet import SD_SCHEDULE

MODEL = BUNDLED_MODEL
GOLDEN = Path(__file__).resolve().parents[2] / ".." / "shared" / "golden" / "consistency_scene0" / "golden.pt"


@pytest.fixture(scope="module")
def base_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(MODEL / "unet").eval()


def _inputs(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=gen), torch.tensor([999, 259])[:batch],
            torch.randn(batch, 77, 64, generator=gen))


def test_w_embedding_matches_the_golden() -> None:
    golden = torch.load(GOLDEN, weights_only=True)
    embedding = guidance_teacher.embed_w(golden["w_values"])
    # measured 2.4e-4 (one float32 ulp of exp() in a frequency, times 1000·w = 19000 rad)
    assert (embedding - golden["w_embedding"]).abs().max() < 2e-3
    assert embedding.shape == (4, guidance_teacher.W_EMBEDDING_DIM)
    assert torch.equal(embedding[0], torch.cat([torch.zeros(256), torch.ones(256)]))  # w = 0 is not zero


def test_cfg_target_is_conditional_at_w0() -> None:
    cond, uncond = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    out = guidance_teacher.cfg_target(cond, uncond, torch.tensor([0.0, 1.0, 7.0]))
    assert torch.equal(out[0], cond[0])
    torch.testing.assert_close(out[2], cond[2] + 7.0 * (cond[2] - uncond[2]))


def test_guided_unet_starts_as_the_w_free_model(base_unet: UNet2DConditionModel) -> None:
    student = guidance_teacher.guided_unet(base_unet).eval()
    assert student.config.time_cond_proj_dim == 512
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    z, t, context = _inputs()
    with torch.no_grad():
        expected = base_unet(z, t, encoder_hidden_states=context).sample
        got = student(z, t, encoder_hidden_states=context,
                      timestep_cond=guidance_teacher.embed_w(torch.tensor([7.0, 19.0]))).sample
    assert torch.equal(got, expected)


def test_relative_mse_weighs_rows_by_their_target() -> None:
    target = torch.stack([torch.ones(4), 10 * torch.ones(4)])
    pred = target * 1.1  # 10 % off in every row
    torch.testing.assert_close(guidance_teacher.relative_mse(pred, target), torch.tensor(0.01))


def test_lora_adapters_fuse_like_the_engine_loader(base_unet: UNet2DConditionModel, tmp_path: Path) -> None:
    unet = guidance_teacher.guided_unet(base_unet).eval()
    reference = guidance_teacher.guided_unet(base_unet).eval()
    adapters = attach_lora(unet, rank=4, seed=0)
    assert len(adapters) == 277  # the authors' lora_modules on the SD 1.x layout (as tiny-icd has)
    z, t, context = _inputs(1)
    emb = guidance_teacher.embed_w(torch.tensor([0.0, 7.0]))
    with torch.no_grad():
        before = unet(z, t, encoder_hidden_states=context, timestep_cond=emb).sample
        plain = reference(z, t, encoder_hidden_states=context, timestep_cond=emb).sample
        assert torch.equal(before, plain)  # B = 0: a fresh adapter changes nothing
        gen = torch.Generator().manual_seed(2)
        for delta in adapters.values():
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=gen) * 0.02)
        trained = unet(z, t, encoder_hidden_states=context, timestep_cond=emb).sample
    path = save_lora_file(tmp_path / "lora.safetensors", adapters)
    pairs = read_lora(path)
    assert all(key.startswith(PEFT_PREFIX) for key in load_file(str(path)))
    fuse_lora(reference, pairs)
    with torch.no_grad():
        fused = reference(z, t, encoder_hidden_states=context, timestep_cond=emb).sample
    rel = float((fused - trained).norm() / (trained - plain).norm())
    assert rel < 5e-3  # measured 2.7e-4: the loader's float16 rounding of A and B
    assert float((trained - plain).norm() / plain.norm()) > 1e-2  # the adapters did move the UNet


def test_boundaries_and_jumps() -> None:
    assert consistency.reverse_boundary(torch.tensor([0, 19, 259, 260, 778, 779, 999])).tolist() == \
        [0, 0, 259, 259, 519, 779, 779]
    assert consistency.forward_boundary(torch.tensor([39, 259, 260, 980, 999])).tolist() == [259, 259, 519, 999, 999]
    grid = consistency.Grid.build(DDPMScheduler(**SD_SCHEDULE))
    assert grid.timesteps[0] == 19 and grid.timesteps[-1] == 999 and grid.gap == 20
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t, s = torch.tensor([999, 519, 259]), torch.tensor([779, 259, 0])
    zt = grid.alphas[t].view(-1, 1, 1, 1) * x0 + grid.sigmas[t].view(-1, 1, 1, 1) * eps
    expected = grid.alphas[s].view(-1, 1, 1, 1) * x0 + grid.sigmas[s].view(-1, 1, 1, 1) * eps
    expected[2] = x0[2]  # s = 0 is the hard boundary: the clean latent
    torch.testing.assert_close(consistency.jump(eps, zt, t, s, grid), expected, atol=1e-5, rtol=1e-5)


def test_consistency_loss_is_zero_where_the_target_is_the_teacher_step(base_unet: UNet2DConditionModel) -> None:
    """A grid step that lands on a boundary makes the target the teacher's own DDIM step, so a
    student equal to the teacher has zero loss there, and a positive one elsewhere."""
    unet = guidance_teacher.guided_unet(base_unet).eval()
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    grid = consistency.Grid.build(scheduler)
    gen = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 4, 16, 16, generator=gen)
    context, w = torch.randn(1, 77, 64, generator=gen), torch.zeros(1)

    def loss(forward: bool, t: int) -> float:
        index = torch.tensor([(t - 19) // 20])
        with torch.no_grad():
            return float(consistency.consistency_loss(unet, unet, z0, noise, context, w, grid, scheduler, forward,
                                                      1e-3, gen, index=index))

    assert loss(False, 279) < 1e-6 and loss(True, 499) < 1e-6  # measured 0.0 (279 -> 259, 499 -> 519: boundaries)
    # the student's own jump from the next time: measured 3.8e-4 (reverse) and 2.6e-4 (forward)
    assert loss(False, 299) > 2e-5 and loss(True, 479) > 2e-5


def test_smoke_runs_write_files_the_engine_loads(tmp_path: Path) -> None:
    teacher_out, icd_out = tmp_path / "teacher", tmp_path / "icd"
    metrics = guidance_teacher.train(guidance_teacher.parse_args(
        ["--model", str(MODEL), "--out", str(teacher_out), "--smoke", "--seed", "1"]))
    assert metrics["step"] == 3 and set(metrics["heldout_rel_err"]) == set(guidance_teacher.EVAL_W)
    teacher_file = teacher_out / guidance_teacher.TEACHER_FILE
    icd = consistency.train(consistency.parse_args(
        ["--model", str(MODEL), "--teacher", str(teacher_file), "--out", str(icd_out), "--smoke", "--seed", "1",
         "--rank", "2", "--pool-from", str(teacher_out / "latent_pool.pt"), "--preserve-coef", "1.5"]))
    assert icd["step"] == 3 and icd["recon_psnr_db"] > 5
    loaded = load_consistency_unets(dict(UNet2DConditionModel.load_config(MODEL / "unet")), ConsistencyFiles(
        teacher_file, icd_out / consistency.REVERSE_FILE, icd_out / consistency.FORWARD_FILE))
    assert loaded.guidance_embedding_dim == 512
    # resume: a second run starts from the checkpoint's step
    consistency.train(consistency.parse_args(
        ["--model", str(MODEL), "--teacher", str(teacher_file), "--out", str(icd_out), "--smoke", "--seed", "1",
         "--rank", "2", "--pool-from", str(teacher_out / "latent_pool.pt"), "--resume"]))
    assert "start step=3" in (icd_out / "train.log").read_text()
    cycle_out = tmp_path / "cycle"
    cycle = cycle_finetune.train(cycle_finetune.parse_args(
        ["--model", str(MODEL), "--teacher", str(teacher_file), "--lora-dir", str(icd_out), "--out", str(cycle_out),
         "--pool-from", str(teacher_out / "latent_pool.pt"), "--smoke", "--seed", "1"]))
    assert cycle["step"] == 3 and cycle["cycle_mse_last25"] > 0
    tuned = read_lora(cycle_out / consistency.FORWARD_FILE)
    assert set(tuned) == set(read_lora(icd_out / consistency.FORWARD_FILE))  # same modules, same layout


class _NoiseOracle(torch.nn.Module):
    """A stand-in UNet whose ε is a fixed tensor (the noise that made the latent, or anything else)."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, z, t, encoder_hidden_states=None, timestep_cond=None):
        return type("Out", (), {"sample": self.eps})()


def test_preservation_loss_is_zero_for_exact_jumps_and_positive_otherwise() -> None:
    """iCD's preservation loss (the authors' forward/reverse_preserve_train_step): with both models
    returning the noise that made the latent, the jump to the other boundary and back is exact at
    every boundary pair (0→19, 259, 519, 779 against 259, 519, 779, 999), in both directions; a
    model with another ε does not come back."""
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    grid = consistency.Grid.build(scheduler)
    gen = torch.Generator().manual_seed(4)
    z0, noise = torch.randn(4, 4, 16, 16, generator=gen), torch.randn(4, 4, 16, 16, generator=gen)
    context, index = torch.zeros(4, 77, 64), torch.arange(4)
    exact, other = _NoiseOracle(noise), _NoiseOracle(torch.randn(4, 4, 16, 16, generator=gen))
    for forward in (True, False):
        loss = consistency.preservation_loss(exact, exact, z0, noise, context, grid, scheduler, forward, 1e-3, gen,
                                             index=index)
        assert float(loss) < 1e-6  # measured 0.0 (forward) and 8.5e-14 (reverse)
        drift = consistency.preservation_loss(other, exact, z0, noise, context, grid, scheduler, forward, 1e-3, gen,
                                              index=index)
        assert float(drift) > 1e-2  # measured 0.63 (forward) and 1.37 (reverse)


def test_export_declares_files_the_loader_reads_and_a_zero_reverse_lora_is_the_teacher(tmp_path: Path) -> None:
    from gnr_fast.consistency_models import load_guidance_unet
    from gnr_fast.model_defaults import load_model_defaults
    from gnr_shapes.training import export_consistency

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    shutil.copy(MODEL / "unet" / "config.json", model / "unet")
    shipped = load_model_defaults(MODEL).consistency
    (model / "gnr_fast.json").write_text(json.dumps({"format": 1, "preset": "shapes"}))
    export_consistency.export(model, shipped.teacher_unet, shipped.forward_lora, None, 1, "shapes_consistency")
    defaults = load_model_defaults(model)
    assert defaults.sampler == "ddim" and defaults.preset == "shapes"  # offered, not the default
    assert defaults.consistency.preset == "shapes_consistency"
    config = dict(UNet2DConditionModel.load_config(model / "unet"))
    exported = load_consistency_unets(config, ConsistencyFiles(
        defaults.consistency.teacher_unet, defaults.consistency.reverse_lora, defaults.consistency.forward_lora))
    original = load_consistency_unets(config, ConsistencyFiles(
        shipped.teacher_unet, shipped.reverse_lora, shipped.forward_lora))
    teacher = load_guidance_unet(config, shipped.teacher_unet).state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in exported.reverse.state_dict().items())  # B = 0
    forward = original.forward.state_dict()
    assert all(torch.equal(v, forward[k]) for k, v in exported.forward.state_dict().items())  # float16 round trip
