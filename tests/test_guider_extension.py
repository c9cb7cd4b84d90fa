"""A guider defined only here — its config and its energy — is registered, named in a YAML config and
runs in both modes on the tiny pipeline with no edit of the package (docs/architecture.md,
"where to add a guider").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from gnr_fast import EditConfig
from gnr_fast.attention.capture import PassCapture
from gnr_fast.attention.sites import FeatureSite
from gnr_fast.errors import ConfigError
from gnr_fast.guiders import GuiderConfig, GuiderKind, Role, register_guider, scale_at, unregister_guider

STEPS = 4
SOURCE, TARGET = "a red circle", "a green square"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as tests/test_fast_vs_reference.py, for the same reason

ENERGY_STEPS: list[int] = []
"""The steps at which :class:`MidFeaturesPower` computed its energy (reset per edit)."""


@dataclass(frozen=True)
class MidFeaturesPower(GuiderConfig):
    """mean(|Φ_trg − Φ_inv|^power) of the UNet's mid block output; pair (cur_trg, inv_inv)."""

    name: ClassVar[str] = "mid_features_power"
    kind: ClassVar[GuiderKind] = GuiderKind.ENERGY
    reads: ClassVar[tuple[Role, ...]] = (Role.CUR_TRG, Role.INV_INV)
    power: float = 1.0

    @property
    def feature_sites(self) -> frozenset[FeatureSite]:
        return frozenset({FeatureSite.MID})

    def energy(self, step: int, captures: Mapping[Role, PassCapture], layers: frozenset[int]) -> torch.Tensor:
        ENERGY_STEPS.append(step)
        cur = captures[Role.CUR_TRG].features[FeatureSite.MID].float()
        inv = captures[Role.INV_INV].features[FeatureSite.MID].float()
        return scale_at(self.scale, step) * torch.mean(torch.abs(cur - inv) ** self.power)


YAML = f"""
scheduler_type: ddim_{STEPS}_eps
guiders:
  - name: cfg
    g_scale: 7.5
  - name: mid_features_power
    g_scale: [40.0, 40.0, 40.0, 0.0]
    kwargs:
      power: 2.0
noise_rescaling_setup:
  type: range_other_on_cfg_norm
  init_setup: [0.33, 3.0]
"""

# Measured 2026-12-07 (torch CPU, one thread, tiny pipeline, 4 steps): rel. L2 of the fast vs the
# reference final latents 4.6e-6 (the bound is ≈ 19x that); the guider moved the edit by 0.70
# against the cfg-only edit; UNet calls 16 (reference) vs 7 (fast).
BOUND = 9e-5


@pytest.fixture(scope="module")
def registered():
    register_guider(MidFeaturesPower)
    yield MidFeaturesPower
    unregister_guider(MidFeaturesPower.name)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_unregistered_guider_is_unknown_to_yaml():
    with pytest.raises(ConfigError, match="mid_features_power"):
        EditConfig.from_yaml(YAML)


def test_yaml_builds_the_registered_guider(registered):
    config = EditConfig.from_yaml(YAML)
    guider = config.guiders[1]
    assert type(guider) is registered and guider.power == 2.0 and guider.scale == (40.0, 40.0, 40.0, 0.0)


def test_new_guider_runs_in_both_modes(registered, tiny_editor):
    config = EditConfig.from_yaml(YAML)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    inversion = tiny_editor.invert(image, SOURCE, num_steps=STEPS, progress=False)
    cfg_only = EditConfig(guiders=(config.guiders[0],), rescale=config.rescale, num_steps=STEPS)
    plain = tiny_editor.edit(inversion, TARGET, config=cfg_only, mode="reference", progress=False).latents
    results, steps = {}, {}
    for mode in ("reference", "fast"):
        ENERGY_STEPS.clear()
        results[mode] = tiny_editor.edit(inversion, TARGET, config=config, mode=mode, progress=False)
        steps[mode] = list(ENERGY_STEPS)
    # The reference evaluates every energy guider at every step; the fast plan only where its scale is non-zero.
    assert steps == {"reference": [0, 1, 2, 3], "fast": [0, 1, 2]}
    diff = _rel(results["fast"].latents, results["reference"].latents)
    assert diff < BOUND, f"fast vs reference {diff:.2e}"
    effect = _rel(results["reference"].latents, plain)
    assert effect > 100 * BOUND, f"the new guider moved the edit by only {effect:.2e}"
    assert results["fast"].unet_calls < results["reference"].unet_calls
