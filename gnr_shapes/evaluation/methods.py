"""The edit methods the quality benchmark compares: which sampler, how many steps, which config.

DDIM methods (issue 4) run the engine's 50-step presets, or the same presets at fewer steps (their
guidance windows scale with the step count, :func:`gnr_fast.config.window_for`). Consistency
methods (issue 35) run a consistency model's preset — written for the model's K boundaries — at K
steps or at fewer: a k-step edit keeps every (K/k)-th boundary, ending at the last
(:func:`skip_boundaries`), and the preset's per-step values at the steps that start at a kept
boundary (:func:`kept_steps`). ``guiders=False`` keeps the prompt switch and classifier-free
guidance (the CFG guider; a consistency model's guidance embedding) and drops every energy guider.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from gnr_fast.config import ALL_PRESET_NAMES, CfgGuider, EditConfig, RescaleConfig
from gnr_fast.consistency_models import load_consistency_model
from gnr_fast.editor import Editor
from gnr_fast.errors import ConfigError
from gnr_fast.guiders import cfg_guider
from gnr_fast.guiders.scales import schedule_len
from gnr_fast.samplers import ConsistencySampler

SamplerName = Literal["ddim", "consistency"]
MethodFactory = Callable[[int], EditConfig]
"""A DDIM method's config for a step count."""


def baseline_config(num_steps: int, cfg: float = 7.5) -> EditConfig:
    """DDIM inversion + CFG toward the target prompt, no guiders (the paper's "DDIM + CFG" baseline)."""
    return EditConfig(guiders=(CfgGuider(cfg),), rescale=RescaleConfig("identity_rescaler"), num_steps=num_steps)


@dataclass(frozen=True)
class Method:
    """One benchmarked way to edit.

    ``config`` is a DDIM method's config for its step count; a consistency method has none and runs
    the run's consistency preset (:func:`method_config`). ``steps`` None: the run's ``--steps``.
    """

    sampler: SamplerName = "ddim"
    config: MethodFactory | None = None
    steps: int | None = None
    guiders: bool = True  # False: the CFG guider alone, identity rescaler

    def num_steps(self, run_steps: int) -> int:
        """The steps of its inversion and its edit in a run of ``run_steps`` (the ``--steps`` option)."""
        return self.steps if self.steps is not None else run_steps


def _shapes_at(steps: int) -> Method:
    return Method(config=EditConfig.shapes, steps=steps)


METHODS: dict[str, Method] = {
    "baseline": Method(config=baseline_config),
    # The baseline at the CFG scale of the `shapes` preset, to compare preservation at comparable guidance.
    "baseline-cfg4": Method(config=lambda num_steps: baseline_config(num_steps, cfg=4.0)),
    "gar-nonstyle": Method(config=EditConfig.nonstyle),
    "gar-style": Method(config=EditConfig.style),
    "gar-shapes": Method(config=EditConfig.shapes),
    # The `shapes` preset at fewer DDIM steps (inversion and edit): what fewer steps cost.
    "gar-shapes-25": _shapes_at(25),
    "gar-shapes-10": _shapes_at(10),
    "gar-shapes-5": _shapes_at(5),
    # Consistency models (issue 35): GaR at the model's 4 boundaries, the same without guiders, 2 steps.
    "cons-gar-4": Method(sampler="consistency", steps=4),
    "cons-cfg-4": Method(sampler="consistency", steps=4, guiders=False),
    "cons-gar-2": Method(sampler="consistency", steps=2),
}

DEFAULT_METHODS: tuple[str, ...] = ("baseline", "baseline-cfg4", "gar-nonstyle", "gar-style", "gar-shapes")
"""``gnr-fast eval``'s methods unless named: the DDIM methods at the run's step count."""
FRONTIER_METHODS: tuple[str, ...] = (
    "gar-shapes", "gar-shapes-25", "gar-shapes-10", "gar-shapes-5", "cons-gar-4", "cons-cfg-4", "cons-gar-2",
)
"""``gnr-fast eval --frontier``'s methods: the quality/latency frontier of issue 35."""

RECONSTRUCTION_SCALE: dict[SamplerName, float] = {"ddim": 1.0, "consistency": 0.0}
"""The CFG guider's scale at which a sampler's noise is the plain conditional ε(z, t, c): DDIM's
ε_u + w (ε_c − ε_u) at w = 1; a consistency model's guidance embedding at w = 0 (its distilled
target is ε_c + w (ε_c − ε_u), the LCM / iCD convention)."""


def reconstruction_config(sampler: SamplerName, num_steps: int) -> EditConfig:
    """The inversion's reconstruction: regenerate the inverted latent under the *source* prompt with
    the plain conditional noise (no guidance, no guiders) through the sampler's editing steps."""
    return EditConfig(guiders=(CfgGuider(RECONSTRUCTION_SCALE[sampler]),), rescale=RescaleConfig("identity_rescaler"),
                      num_steps=num_steps)


def cfg_only(config: EditConfig) -> EditConfig:
    """``config`` without its energy and direct guiders: the CFG guider alone, identity rescaler."""
    return replace(config, guiders=(cfg_guider(config.guiders),), rescale=RescaleConfig("identity_rescaler"))


def skip_boundaries(boundaries: Sequence[int], steps: int) -> tuple[int, ...]:
    """Every (K/``steps``)-th of K ascending boundaries, ending at the last: (259, 519, 779, 999) at
    2 steps → (519, 999). ``steps`` must divide K."""
    total = len(boundaries)
    if steps < 1 or total % steps:
        raise ConfigError(f"a consistency model with {total} boundaries {list(boundaries)} edits in a divisor of "
                          f"{total} steps, got {steps}")
    stride = total // steps
    return tuple(boundaries[stride - 1 :: stride])


def kept_steps(total: int, steps: int) -> tuple[int, ...]:
    """The editing steps of a ``total``-step consistency edit that start at a boundary
    :func:`skip_boundaries` keeps at ``steps`` steps (step i starts at boundary K − 1 − i): 4 → 2 keeps (0, 2)."""
    kept = skip_boundaries(range(total), steps)
    return tuple(sorted(total - 1 - j for j in kept))


def config_at_steps(config: EditConfig, steps: Sequence[int]) -> EditConfig:
    """``config`` for an edit of ``len(steps)`` steps: every per-step schedule of every guider keeps
    its values at ``steps`` (constant scales stay)."""
    guiders = []
    for guider in config.guiders:
        schedules = [s for s in guider.schedules().values() if schedule_len(s) is not None]
        changes = {f.name: tuple(getattr(guider, f.name)[i] for i in steps) for f in fields(guider)
                   if any(getattr(guider, f.name) is s for s in schedules)}
        guiders.append(replace(guider, **changes))
    return replace(config, guiders=tuple(guiders), num_steps=len(steps))


def method_config(method: Method, num_steps: int, consistency_preset: EditConfig | None = None) -> EditConfig:
    """The config ``method`` edits with at ``num_steps`` steps; a consistency method's comes from
    ``consistency_preset`` (written for the model's boundaries) at :func:`kept_steps`."""
    if method.config is not None:
        config = method.config(num_steps)
    elif consistency_preset is None:
        raise ConfigError("a consistency method needs the run's consistency preset")
    else:
        config = config_at_steps(consistency_preset, kept_steps(consistency_preset.num_steps, num_steps))
    return config if method.guiders else cfg_only(config)


@dataclass(frozen=True)
class ConsistencyOptions:
    """Where a run's consistency methods get their files and preset: the model folder's
    ``gnr_fast.json`` unless a file is named (``--teacher-unet`` …); ``preset`` is a preset name or
    a YAML file written for the model's boundaries (None: the model's consistency preset, the one
    its consistency edits use when a call names none)."""

    teacher_unet: str | None = None
    reverse_lora: str | None = None
    forward_lora: str | None = None
    preset: str | None = None

    def load_preset(self, model_preset: str) -> EditConfig:
        """The preset as an :class:`EditConfig` (``model_preset`` when this names none)."""
        name = self.preset if self.preset is not None else model_preset
        return EditConfig.preset(name) if name in ALL_PRESET_NAMES else EditConfig.from_yaml(name)


@dataclass
class ConsistencyEditors:
    """One consistency-model :class:`~gnr_fast.Editor` per step count, and their preset."""

    editors: dict[int, Editor]
    preset: EditConfig


def load_consistency_editors(model: str | Path | None, step_counts: Sequence[int],
                             options: ConsistencyOptions) -> ConsistencyEditors:
    """An editor of ``model``'s consistency files per step count: at the model's boundary count the
    one ``Editor.from_pretrained(model, sampler="consistency", ...)`` loads, as a user's; at fewer
    steps an :class:`~gnr_fast.Editor` of a freshly loaded model
    (:func:`~gnr_fast.consistency_models.load_consistency_model`: each editor installs its attention
    captures on its own UNets) over a sampler of :func:`skip_boundaries`."""
    files = {"teacher_unet": options.teacher_unet, "reverse_lora": options.reverse_lora,
             "forward_lora": options.forward_lora}
    full = Editor.from_pretrained(model, sampler="consistency", **files)
    editors = {}
    for steps in dict.fromkeys(step_counts):
        if steps == full.default_steps:
            editors[steps] = full
            continue
        loaded = load_consistency_model(model, **files)
        sampler = ConsistencySampler(loaded.sampler.alphas_cumprod, skip_boundaries(loaded.sampler.boundaries, steps))
        editors[steps] = Editor(loaded.components, defaults=loaded.defaults, inversion_unet=loaded.forward,
                                sampler=sampler)
    return ConsistencyEditors(editors, options.load_preset(full.default_preset))
