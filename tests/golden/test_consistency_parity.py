"""Parity with the authors' Inverse-and-Edit run on the tiny consistency model (issue 34):
../shared/golden/consistency_scene0, made by their code on ../shared/golden/tiny-icd (README_consistency.md).

Everything runs through the engine's seams: :class:`gnr_fast.Editor` on the consistency folder (one
session, a UNetExecutor per fused UNet, the planner and the fast batch step, the consistency sampler).
One torch thread, float32, as the golden. Relative L2 errors ‖a − b‖ / ‖b‖. Bounds are ~15–20× the
error measured here (torch 2.13.0 CPU, one thread, 2026-12-07), each beside its bound. The golden's
own float32 spread, regenerated under the authors' pinned library versions (README_consistency.md),
is of the same order (≤ 1e-5 UNet terms, 3.3e-5 guider_grad, 5.9e-5 ε_final, 1.3e-5 latents), so
the bounds sit at or below the README's suggestions (1e-4 terms, 1e-3 gradient and γ, 1e-5
inversion) where the measurement allows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gnr_fast import Editor
from gnr_fast.batch import EditRequest
from gnr_fast.config import FeatureSite
from gnr_fast.fast.step import batch_step
from gnr_fast.families import guidance_scale_embedding
from gnr_fast.images import decode_latent
from gnr_fast.noise_terms import Eps
from gnr_fast.runtime import CallKind, RuntimeConfig
from gnr_fast.schedules import timestep_tensors
from tests.consistency_model import consistency_model_dir

SRC = "a red circle on a blue background"
TRG = "a green circle on a blue background"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def scene(golden_dir):
    return golden_dir / "consistency_scene0"


@pytest.fixture(scope="module")
def golden(scene):
    return torch.load(scene / "golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def model_dir(golden_dir, tmp_path_factory):
    return consistency_model_dir(golden_dir, tmp_path_factory.mktemp("icd"))


@pytest.fixture(scope="module")
def editor(model_dir, one_torch_thread) -> Editor:
    return Editor.from_pretrained(model_dir)


def test_schedule_timesteps_and_w(editor, golden):
    sampler = editor.fixed_sampler
    assert torch.equal(sampler.alphas_cumprod, golden["alphas_cumprod"])
    assert list(sampler.forward_timesteps) == golden["inv_t"].tolist()
    assert list(sampler.forward_boundaries) == golden["inv_s"].tolist()
    assert list(sampler.timesteps) == golden["edit_t"].tolist()
    assert list(sampler.reverse_boundaries) == golden["edit_s"].tolist()
    cfg = editor.resolve_config().guiders[0]  # the folder's preset: consistency
    assert list(cfg.scale) == golden["w_trg"].tolist()
    # measured 1.18e-5: 1-ulp differences of the float32 sin/exp arguments (up to 19000 rad) between CPUs
    assert rel(guidance_scale_embedding(golden["w_values"], 512), golden["w_embedding"]) <= 2e-4


def test_prompt_embeddings(editor, golden):
    for j, prompt in enumerate(("", SRC, TRG)):
        assert rel(editor.embed(prompt), golden["prompt_embeds"][j : j + 1]) <= 3e-6  # measured 1.5e-7


def test_inversion_teacher_forced(editor, golden):
    sampler = editor.fixed_sampler
    assert torch.equal(sampler.inversion_noise(golden["inv_noise"].shape), golden["inv_noise"])
    assert torch.equal(sampler.noised_start(golden["image_latent"], golden["inv_noise"]), golden["inv_input_latents"][0])
    c_src = editor.embed(SRC)
    t_tensors = timestep_tensors(list(sampler.forward_timesteps))
    for k, (t, s) in enumerate(zip(sampler.forward_timesteps, sampler.forward_boundaries)):
        x = golden["inv_input_latents"][k]
        with torch.no_grad():  # the forward model's executor, w = 0
            eps = editor.inversion_runner.plain(x, t_tensors[k], c_src, [0.0])
        assert rel(eps, golden["inv_eps"][k]) <= 2e-5  # measured ≤ 1.4e-6
        assert rel(sampler.jump(x, eps, t, s), golden["inv_latents"][k + 1]) <= 2e-5  # measured ≤ 1.3e-6


def forced_terms(editor: Editor, golden) -> tuple[object, list]:
    """Each editing step teacher-forced through the fast batch step: z = latents[i], z* =
    inv_latent_used[i] (= inv_latents[4 − i]); the source cache keeps each step's source pass."""
    ctx = editor.context(editor.resolve_config(), SRC, TRG)
    cache = ctx.state.source_cache = editor.new_source_cache(ctx)
    terms = []
    for i in range(4):
        assert torch.equal(golden["inv_latents"][4 - i], golden["inv_latent_used"][i])
        terms.append(batch_step([ctx], [golden["latents"][i]], [golden["inv_latent_used"][i]], i)[0])
    return cache, terms


@pytest.fixture(scope="module")
def forced_steps(editor, golden):
    return forced_terms(editor, golden)


def test_edit_steps_teacher_forced(editor, golden, forced_steps):
    cache, terms = forced_steps
    for i, term in enumerate(terms):
        eps_inv, eps_trg = term.supplied[Eps.INV], term.supplied[Eps.TRG]
        assert torch.equal(term.eps_u, eps_trg) and not term.delta_cfg.any()  # base noise ε_trg, no Δcfg
        assert rel(eps_inv, golden["eps_inv"][i]) <= 2e-5  # measured ≤ 1.0e-6
        assert rel(eps_trg, golden["eps_trg"][i]) <= 1e-5  # measured ≤ 7.4e-7
        assert rel(eps_trg - eps_inv, golden["cfg_diff"][i]) <= 5e-5  # measured ≤ 2.5e-6
        assert torch.equal(cache.noise(i), eps_inv)  # ε_inv kept with the source pass for repeat edits
        features = cache.steps[i].features[FeatureSite.UP]
        assert rel(features, golden["features_inv_inv"][i]) <= 2e-5  # measured ≤ 1e-6
        scaled = golden["energy"][i] * golden["g_scale"][i]
        assert abs(float(term.energy) - float(scaled.sum())) <= 1e-4 * float(scaled.sum())  # measured ≤ 6e-6 rel
        assert rel(term.guider_grad, golden["guider_grad"][i]) <= 5e-4  # measured ≤ 2.4e-5 (step 0)
        assert abs(float(term.gamma) - float(golden["gamma"][i])) <= 1e-5 * float(golden["gamma"][i])  # measured ≤ 6.3e-7
        assert rel(term.eps_final, golden["eps_final"][i]) <= 5e-5  # measured ≤ 2.5e-6
        nxt = editor.fixed_sampler.step(golden["latents"][i], term.eps_final, i)
        assert rel(nxt, golden["latents"][i + 1]) <= 1e-5  # measured ≤ 8.7e-7
    # ε_src runs only where an energy reads it (the attention maps: scale 0 at step 0)
    assert Eps.SRC not in terms[0].supplied
    for i in (1, 2, 3):
        assert rel(terms[i].supplied[Eps.SRC], golden["eps_src"][i]) <= 2e-5  # measured ≤ 1e-6


def test_guider_gradient_mutation_is_rejected(golden, forced_steps):
    """The gradient bound is tight enough to catch a 0.1 % error of the guider gradient."""
    _, terms = forced_steps
    wrong = terms[2].guider_grad * 0.999
    assert rel(wrong, golden["guider_grad"][2]) > 5e-4


def _free_run(editor: Editor, scene):
    result = editor.edit(scene / "input.png", TRG, source_prompt=SRC, progress=False)
    components = editor.components
    decoded = decode_latent(components.vae, result.latents, components.scaling_factor)[0]
    return result.inversion, result.latents, decoded, np.asarray(result.image)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def check_free_running(editor, scene, golden) -> None:
    inversion, latent, decoded, edited = _free_run(editor, scene)
    assert rel(inversion.latents[0], golden["image_latent"]) <= 3e-5  # measured 1.6e-6
    assert rel(inversion.latents, golden["inv_latents"]) <= 1e-4  # measured 5.6e-6
    assert abs(inversion.pixel_stats[0] - 95.72062174479167) < 1e-9  # golden.json input_mean
    assert rel(latent, golden["latents"][4]) <= 5e-4  # measured 2.5e-5
    assert np.abs(decoded.astype(int) - golden["edited_decoded"].numpy().astype(int)).max() <= 4  # measured 1
    reference = np.asarray(Image.open(scene / "edited.png").convert("RGB"))
    assert psnr(edited, reference) >= 60.0  # measured 72.3 dB (at most 3 grey levels on 0.07 % of values)


def test_free_running(editor, scene, golden):
    check_free_running(editor, scene, golden)


def test_repeat_edit_reuses_inversion_and_source_passes(editor, scene):
    """A second edit of the same inversion runs only the guided rows (the source cache serves the
    source passes and their ε_inv); same result, bit for bit."""
    first = editor.edit(scene / "input.png", TRG, source_prompt=SRC, progress=False)
    before, inverted = dict(editor.runner.rows_by_kind), editor.inversion_runner.rows
    second = editor.edit(first.inversion, TRG, progress=False)
    after = dict(editor.runner.rows_by_kind)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image)) and first.image.size == (256, 256)
    assert torch.equal(first.latents, second.latents)
    assert second.unet_rows == 1 + 2 * 3
    assert editor.inversion_runner.rows == inverted
    assert after[CallKind.CAPTURING] == before[CallKind.CAPTURING]
    # step 0: the target row only (attention scale 0); steps 1-3: source and target rows
    assert after[CallKind.GRAD] - before[CallKind.GRAD] == 1 + 2 * 3


@pytest.mark.slow  # a 50-step DDIM edit (measured 199 rows: 50 inversion + 149 editing, 25 backward passes)
def test_unet_rows_at_most_an_eighth_of_a_ddim_edit(model_dir, scene, tiny_editor, one_torch_thread):
    """Issue 34's target: a first consistency edit (15 UNet rows) needs <= 1/8 of the
    UNet rows of a first 50-step DDIM GaR edit with the same guiders (the `style` preset). Rows do not
    depend on the model's size, so the DDIM side runs on the tests' tiny pipeline."""
    fresh = Editor.from_pretrained(model_dir)
    result = fresh.edit(scene / "input.png", TRG, source_prompt=SRC, progress=False)
    # 4 inversion rows (forward model); step 0: source + target rows; steps 1-3: source + 2 grad rows
    assert fresh.inversion_runner.rows == 4
    assert dict(fresh.runner.rows_by_kind) == {CallKind.CAPTURING: 4, CallKind.GRAD: 7}
    assert result.unet_rows == 11  # the editing rows (an EditResult counts its group's edit loop)
    rows = fresh.inversion_runner.rows + result.unet_rows
    rows_before = tiny_editor.runner.rows
    tiny_editor.edit(np.asarray(Image.open(scene / "input.png").convert("RGB").resize((64, 64))), TRG,
                     source_prompt=SRC, preset="style", progress=False)
    ddim_rows = tiny_editor.runner.rows - rows_before
    assert rows * 8 <= ddim_rows, (rows, ddim_rows)


def test_batched_edit_matches_single(editor, scene):
    """Two edits in one batch (same image, two targets): each latent is its single edit's, within the
    rounding of batched matmuls."""
    yellow = "a yellow circle on a blue background"
    inversion = editor.invert(scene / "input.png", SRC, progress=False)
    single = editor.edit(inversion, yellow, progress=False).latents
    rows = editor.runner.rows
    batch = editor.edit_batch([EditRequest(inversion, TRG), EditRequest(inversion, yellow)])
    assert batch[0].batch_size == 2 and batch[0].unet_rows == editor.runner.rows - rows
    assert rel(batch[1].latents, single) <= 4e-5  # measured 1.9e-6
    assert rel(batch[0].latents, batch[1].latents) > 1e-2  # the two targets really differ


TRACED = RuntimeConfig("compiled", "compiled", compiler="aot_eager")


@pytest.fixture(scope="module")
def aot_editor(model_dir, one_torch_thread) -> Editor:
    return Editor.from_pretrained(model_dir, runtime=TRACED)


def test_compiled_step_teacher_forced(aot_editor, golden):
    """The compiled runtime (torch.compile(fullgraph=True) of the executor's runners) traces the
    capturing and the grad call of a guided step as whole graphs (AOTAutograd, no code generation:
    the graphs inductor would get), same terms as eager."""
    ctx = aot_editor.context(aot_editor.resolve_config(), SRC, TRG)
    term = batch_step([ctx], [golden["latents"][1]], [golden["inv_latent_used"][1]], 1)[0]
    assert rel(term.supplied[Eps.TRG], golden["eps_trg"][1]) <= 1e-5  # measured 6.7e-7
    assert rel(term.guider_grad, golden["guider_grad"][1]) <= 5e-5  # measured 3.4e-6
    assert rel(term.eps_final, golden["eps_final"][1]) <= 5e-5  # measured 2.3e-6


@pytest.mark.slow
@pytest.mark.parametrize("runtime", [TRACED, pytest.param("compiled", marks=pytest.mark.inductor)],
                         ids=["aot_eager", "inductor"])
def test_compiled_free_running(model_dir, scene, golden, runtime, one_torch_thread):
    """The whole edit on the compiled runtime (aot_eager: ~5 min on a loaded 2-core host; inductor: longer)."""
    editor = Editor.from_pretrained(model_dir, runtime=runtime)
    check_free_running(editor, scene, golden)


def test_bfloat16_model_runs_the_same_path(model_dir, scene, golden, one_torch_thread):
    """A bfloat16 consistency model (the precision module's dtype, as for DDIM): the whole edit, the
    inversion recorded in bfloat16, a repeat edit from the source cache. The tiny random model
    amplifies rounding (‖z‖ grows from 18 to 265), so the bounds are loose but far below an unrelated
    latent's error (~1.4)."""
    editor = Editor.from_pretrained(model_dir, dtype=torch.bfloat16)
    first = editor.edit(scene / "input.png", TRG, source_prompt=SRC, progress=False)
    assert first.inversion.model_dtype == "bfloat16"
    assert rel(first.inversion.latents, golden["inv_latents"]) <= 0.3  # measured 0.067
    assert rel(first.latents, golden["latents"][4]) <= 0.6  # measured 0.243 (float16: 0.032)
    second = editor.edit(first.inversion, TRG, progress=False)
    assert second.unet_rows == 7 and torch.equal(second.latents, first.latents)



@pytest.mark.slow  # two lazy exports: 56-82 s on a loaded 2-core host (2026-12-07)
def test_onnx_plain_calls(model_dir, scene, golden, tmp_path, one_torch_thread):
    """``runtime="onnx"``: plain calls on ONNX Runtime, each fused UNet exported lazily into the cache
    under its own fingerprint, with its ``timestep_cond`` input. Teacher-forced plain ε of both UNets
    (the forward model at w = 0, the reverse model at the edit's w), then a whole edit (its inversion's
    plain calls on ONNX, the guided rows eager) within the eager edit's bounds."""
    from dataclasses import replace

    cache = tmp_path / "onnx-cache"
    editor = Editor.from_pretrained(model_dir, runtime=replace(RuntimeConfig.preset("onnx"), export_cache_dir=cache))
    sampler = editor.fixed_sampler
    c_src, c_trg = editor.embed(SRC), editor.embed(TRG)
    t_inv, t_edit = timestep_tensors(list(sampler.forward_timesteps)), timestep_tensors(list(sampler.timesteps))
    with torch.no_grad():
        for k in range(4):
            eps = editor.inversion_runner.plain(golden["inv_input_latents"][k], t_inv[k], c_src, [0.0])
            assert rel(eps, golden["inv_eps"][k]) <= 2e-5  # measured <= 1.7e-6 (eager: 1.4e-6)
            eps = editor.runner.plain(golden["latents"][k], t_edit[k], c_trg, [float(golden["w_trg"][k])])
            assert rel(eps, golden["eps_trg"][k]) <= 2e-5  # measured <= 1.0e-6 (eager: 7.3e-7)
    units = {editor.inversion_runner.plain_runner.unet_id, editor.runner.plain_runner.unet_id}
    assert len(units) == 2 and {p.name.split("-")[0] for p in cache.iterdir()} == units  # one export per UNet
    check_free_running(editor, scene, golden)
    assert editor.inversion_runner.rows_by_kind[CallKind.PLAIN] == 8  # 4 teacher-forced + the edit's 4 inversion rows
