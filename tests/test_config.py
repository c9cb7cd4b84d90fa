"""Typed configs, presets, schedules and the authors' YAML format (DESIGN.md §6)."""

import pytest

from gnr_fast.config import (
    CfgGuider,
    EditConfig,
    FeaturesMapL2,
    LatentsDiff,
    RescaleConfig,
    SelfAttnMapL2,
    SelfAttnMapL2Appearance,
    first_steps,
    last_steps,
    scale_at,
)
from gnr_fast.errors import ConfigError

NONSTYLE_YAML = """
scheduler_type: ddim_50_eps
inversion_type: dummy
model_name: stable-diffusion-v1-4
pipeline_type: ours
start_latent: inversion
verbose: false
guiders:
    - name: cfg
      g_scale: 7.5
      kwargs:
        is_source_guidance: false
    - name: self_attn_map_l2_appearance
      g_scale: 1.
      kwargs:
        self_attn_gs: 300000.
        app_gs: 500.
        new_features: true
        total_first_steps: 30
noise_rescaling_setup:
    type: range_other_on_cfg_norm
    init_setup:
        - 0.33
        - 3.0
edit_types:
    - animal-2-animal
"""


def style_yaml() -> str:
    attn = "\n".join(f"  - {100000.0 if i < 25 else 0.0}" for i in range(50))
    feat = "\n".join(f"  - {2.5 if i < 25 else 0.0}" for i in range(50))
    return (
        "scheduler_type: ddim_50_eps\ninversion_type: dummy\nedit_types: stylisation\nguiders:\n"
        "- name: cfg\n  g_scale: 7.5\n  kwargs:\n    is_source_guidance: false\n"
        f"- name: self_attn_map_l2\n  g_scale:\n{attn}\n  kwargs: {{}}\n"
        f"- name: features_map_l2\n  g_scale:\n{feat}\n  kwargs: {{}}\n"
        "noise_rescaling_setup:\n  type: range_other_on_cfg_norm\n  init_setup:\n  - 1.5\n  - 1.5\n"
    )


def test_authors_nonstyle_yaml_equals_preset(tmp_path):
    path = tmp_path / "ours_nonstyle_best.yaml"
    path.write_text(NONSTYLE_YAML)
    assert EditConfig.from_yaml(path) == EditConfig.nonstyle()


def test_authors_style_yaml_equals_preset():
    assert EditConfig.from_yaml(style_yaml()) == EditConfig.style()


def test_nonstyle_preset_window():
    app = EditConfig.nonstyle().guiders[1]
    assert isinstance(app, SelfAttnMapL2Appearance)
    assert app.is_active(29) and not app.is_active(30)
    assert scale_at(app.self_attn_scale, 0) == 300000.0 and scale_at(app.app_scale, 29) == 500.0


@pytest.mark.parametrize("steps, window", [(50, 30), (25, 15), (10, 6), (20, 12), (100, 60)])
def test_preset_window_scales_with_steps(steps, window):
    app = EditConfig.nonstyle(steps).guiders[1]
    active = [i for i in range(steps) if app.is_active(i)]
    assert active == list(range(window))


def test_style_preset_window():
    cfg = EditConfig.style(20)
    assert [g.is_active(9) for g in cfg.guiders[1:]] == [True, True]
    assert [g.is_active(10) for g in cfg.guiders[1:]] == [False, False]
    assert cfg.rescale == RescaleConfig("range_other_on_cfg_norm", 1.5, 1.5)


def test_first_last_steps():
    assert first_steps(2.0, 2, 4) == (2.0, 2.0, 0.0, 0.0)
    assert last_steps(2.0, 1, 4) == (0.0, 0.0, 0.0, 2.0)


def test_per_step_list_must_match_steps():
    with pytest.raises(ConfigError, match="40 per-step values"):
        EditConfig(guiders=(CfgGuider(), SelfAttnMapL2(scale=(1.0,) * 40)), num_steps=50)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: EditConfig(guiders=()), "at least one guider"),
        (lambda: EditConfig(guiders=(SelfAttnMapL2(scale=1.0),)), "cfg guider is required"),
        (lambda: EditConfig(guiders=(CfgGuider(), CfgGuider())), "listed twice"),
        (lambda: EditConfig(guiders=(CfgGuider(), LatentsDiff())), "latents_diff cannot be combined"),
        (lambda: EditConfig(guiders=(CfgGuider(),), num_steps=0), "num_steps"),
        (lambda: EditConfig(guiders=(CfgGuider(),), align_inversion="late"), "align_inversion"),
        (lambda: EditConfig(guiders=(CfgGuider(),), self_attn_layers=((0, 6), (0, 1))), "three"),
        (lambda: CfgGuider(scale=float("nan")), "finite"),
        (lambda: CfgGuider(scale=[]), "empty"),
        (lambda: FeaturesMapL2(block="side"), "block"),
        (lambda: RescaleConfig("range_other_on_cfg_norm", 3.0, 0.33), "lo <= hi"),
        (lambda: RescaleConfig("clamp"), "unknown"),
        (lambda: EditConfig.preset("anime"), "preset"),
    ],
)
def test_invalid_configs(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


@pytest.mark.parametrize(
    "text, match",
    [
        ("guiders: [{name: cfg, g_scale: 7.5}]\nfoo: 1\n", "unknown config keys"),
        ("guiders: [{name: magic}]\n", "unknown"),
        ("guiders: [{name: cfg}]\ninversion_type: ntinv\n", "not supported"),
        ("[1, 2]\n", "mapping"),
        ("guiders: [{name: cfg}]\nnoise_rescaling_setup: {type: range_other_on_cfg_norm, init_setup: 3}\n", "lo, hi"),
        ("guiders: [{name: self_attn_map_l2_appearance, kwargs: {app_gs: 1}}, {name: cfg}]\n", "self_attn_gs"),
        ("guiders: [{name: cfg, kwargs: {weird: 1}}]\n", "unexpected"),
        ("guiders: [{name: cfg\n", "valid YAML"),
    ],
)
def test_invalid_yaml(text, match):
    with pytest.raises(ConfigError, match=match):
        EditConfig.from_yaml(text)


def test_identity_rescaler_allows_latents_diff():
    cfg = EditConfig.from_yaml(
        "guiders: [{name: cfg, g_scale: 7.5}, {name: latents_diff, g_scale: 1.0}]\n"
        "noise_rescaling_setup: {type: identity_rescaler}\n"
    )
    assert cfg.rescale.kind == "identity_rescaler" and isinstance(cfg.guiders[1], LatentsDiff)


def test_layer_ranges_from_yaml():
    cfg = EditConfig.from_yaml("guiders: [{name: cfg}]\nself_attn_layers_num: [[1, 3], 1, [2, 9]]\n")
    assert cfg.self_attn_layers == ((1, 3), (0, 1), (2, 9))


def test_shapes_preset_is_nonstyle_with_its_own_cfg_and_appearance_scale():
    shapes, paper = EditConfig.preset("shapes"), EditConfig.nonstyle()
    assert shapes.guiders[0].scale == 4.0 and paper.guiders[0].scale == 7.5
    assert shapes.guiders[1].app_scale == tuple(5000.0 if a else 0.0 for a in paper.guiders[1].app_scale)
    assert shapes.guiders[1].self_attn_scale == paper.guiders[1].self_attn_scale
    assert shapes.rescale == paper.rescale
    assert EditConfig.preset("shapes", 20).guiders[1].app_scale.count(5000.0) == 12


def test_every_preset_name_builds():
    from gnr_fast.config import PRESET_NAMES

    assert all(EditConfig.preset(name).num_steps == 50 for name in PRESET_NAMES)
