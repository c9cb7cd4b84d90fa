"""Typed, validated edit configuration: guiders, noise rescaling, presets, YAML (DESIGN.md §4–6).

A guider's scale is a :data:`Schedule`: one float for every step, or a tuple with one float per
step. Presets are defined by the paper for 50 steps; for N steps their guidance windows scale
proportionally (the non-stylisation "first 30 of 50" becomes ``round(0.6 · N)`` steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Mapping, Sequence

import yaml

from .attention.sites import FeatureSite, LayerRange
from .errors import ConfigError
from .guiders import (
    GUIDERS,
    CfgGuider,
    FeaturesMapL2,
    GuiderConfig,
    LatentsDiff,
    Role,
    Schedule,
    SelfAttnMapL2,
    SelfAttnMapL2Appearance,
    check_guiders,
    first_steps,
    guider_type,
    last_steps,
    scale_at,
)

__all__ = [
    "GUIDER_TYPES", "PRESET_NAMES", "PRESET_STEPS", "AlignInversion", "CfgGuider", "EditConfig", "FeatureSite",
    "FeaturesMapL2", "GuiderConfig", "LatentsDiff", "LayerRange", "RescaleConfig", "Role", "Schedule",
    "SelfAttnMapL2", "SelfAttnMapL2Appearance", "first_steps", "last_steps", "scale_at", "window_for",
]

GUIDER_TYPES = GUIDERS
"""The guider registry (:data:`gnr_fast.guiders.GUIDERS`) under its older name."""

PRESET_STEPS = 50
"""The step count the paper's presets (and the authors' per-step lists) are written for."""
PRESET_NAMES = ("nonstyle", "style", "shapes")
"""Named presets: the paper's two, and ``shapes`` for the bundled model (:meth:`EditConfig.shapes`)."""
CONSISTENCY_STEPS = 4
"""The step count the consistency preset is written for (the consistency model's boundaries)."""
CONSISTENCY_PRESET_NAMES = ("consistency", "shapes_consistency")
"""Presets for consistency models (:meth:`EditConfig.consistency`, and :meth:`EditConfig.shapes_consistency`
for the bundled model's distilled consistency models)."""
ALL_PRESET_NAMES = PRESET_NAMES + CONSISTENCY_PRESET_NAMES
"""Every named preset :meth:`EditConfig.preset` knows."""


def window_for(steps_of_50: int, num_steps: int) -> int:
    """Scale a window given for 50 steps to ``num_steps`` (``round(steps_of_50 / 50 · num_steps)``)."""
    return int(round(steps_of_50 / PRESET_STEPS * num_steps))


@dataclass(frozen=True)
class RescaleConfig:
    """Noise rescaling (DESIGN.md §5): clip ‖guider term‖ / ‖Δcfg‖ into [lo, hi], or identity."""

    kind: Literal["range_other_on_cfg_norm", "identity_rescaler"] = "range_other_on_cfg_norm"
    lo: float = 0.33
    hi: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in ("range_other_on_cfg_norm", "identity_rescaler"):
            raise ConfigError(
                f"noise_rescaling_setup.type {self.kind!r} is unknown; use 'range_other_on_cfg_norm' or "
                "'identity_rescaler'"
            )
        for bound in (self.lo, self.hi):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise ConfigError(f"noise rescaling bounds must be finite numbers, got ({self.lo!r}, {self.hi!r})")
        if self.kind == "range_other_on_cfg_norm" and not (0 <= self.lo <= self.hi and self.hi > 0):
            raise ConfigError(f"noise rescaling range needs 0 <= lo <= hi and hi > 0, got ({self.lo}, {self.hi})")


AlignInversion = Literal["reference", "exact"]


@dataclass(frozen=True)
class EditConfig:
    """Everything that defines an edit besides the image and prompts.

    ``self_attn_layers`` selects self-attention layers per block group (down, mid, up) as
    half-open ``(start, end)`` ranges in forward order, like the reference's
    ``self_attn_layers_num``; ``None`` means all layers. ``align_inversion='reference'`` pairs
    the latent of step i with inv[N − i] as the authors' code does; ``'exact'`` pairs the
    time-aligned inv[N − 1 − i] (DESIGN.md §3).
    """

    guiders: tuple[GuiderConfig, ...]
    rescale: RescaleConfig = field(default_factory=RescaleConfig)
    num_steps: int = PRESET_STEPS
    self_attn_layers: tuple[LayerRange, LayerRange, LayerRange] | None = None
    align_inversion: AlignInversion = "reference"
    energy_atol: float = 1e-8
    """An energy with |E| ≤ this counts as zero and runs no backward (the reference's allclose)."""
    match_colors: bool = True
    """Whether the decoded image is colour-matched to the input's pixel mean and std where the
    sampler does so (the consistency sampler, as the authors' Inverse-and-Edit code; DDIM never does).
    A matched image cannot change its overall colour, so background-colour edits suffer."""

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or not 1 <= self.num_steps <= 1000:
            raise ConfigError(f"num_steps must be an integer in [1, 1000], got {self.num_steps!r}")
        guiders = tuple(self.guiders)
        object.__setattr__(self, "guiders", guiders)
        check_guiders(guiders, self.num_steps, self.rescale.kind)
        if not isinstance(self.match_colors, bool):
            raise ConfigError(f"match_colors must be true or false, got {self.match_colors!r}")
        if self.align_inversion not in ("reference", "exact"):
            raise ConfigError(f"align_inversion must be 'reference' or 'exact', got {self.align_inversion!r}")
        if self.self_attn_layers is not None:
            ranges = tuple(tuple(r) for r in self.self_attn_layers)
            if len(ranges) != 3 or any(len(r) != 2 or not 0 <= r[0] <= r[1] for r in ranges):
                raise ConfigError(
                    f"self_attn_layers must be three (start, end) ranges for down, mid, up, got {self.self_attn_layers!r}"
                )
            object.__setattr__(self, "self_attn_layers", ranges)

    # --- presets (DESIGN.md §6) -------------------------------------------------------------

    @classmethod
    def nonstyle(cls, num_steps: int = PRESET_STEPS) -> "EditConfig":
        """Non-stylisation preset: cfg 7.5 + self-attention/appearance guider for the first 60 % of steps."""
        return cls._nonstyle_family(num_steps, cfg=7.5, app=500.0)

    @classmethod
    def shapes(cls, num_steps: int = PRESET_STEPS) -> "EditConfig":
        """Preset for the bundled ``shapes-v1`` model (ours, not the paper's): ``nonstyle`` with cfg 4
        and a 10× appearance scale (5000). Chosen on tuning edits disjoint from the quality
        benchmark's (benchmarks/quality/README.md): the paper's cfg 7.5 over-saturates this small
        model and its appearance weight lets the background colour drift."""
        return cls._nonstyle_family(num_steps, cfg=4.0, app=5000.0)

    @classmethod
    def _nonstyle_family(cls, num_steps: int, cfg: float, app: float) -> "EditConfig":
        window = window_for(30, num_steps)
        return cls(
            guiders=(
                CfgGuider(scale=cfg),
                SelfAttnMapL2Appearance(
                    scale=1.0,
                    self_attn_scale=first_steps(300000.0, window, num_steps),
                    app_scale=first_steps(app, window, num_steps),
                    new_features=True,
                ),
            ),
            rescale=RescaleConfig("range_other_on_cfg_norm", 0.33, 3.0),
            num_steps=num_steps,
        )

    @classmethod
    def style(cls, num_steps: int = PRESET_STEPS) -> "EditConfig":
        """Stylisation preset: cfg 7.5 + self-attention maps and 'up' features for the first 50 % of steps."""
        window = window_for(25, num_steps)
        return cls(
            guiders=(
                CfgGuider(scale=7.5),
                SelfAttnMapL2(scale=first_steps(100000.0, window, num_steps)),
                FeaturesMapL2(scale=first_steps(2.5, window, num_steps), block="up"),
            ),
            rescale=RescaleConfig("range_other_on_cfg_norm", 1.5, 1.5),
            num_steps=num_steps,
        )

    @classmethod
    def consistency(cls, num_steps: int = CONSISTENCY_STEPS) -> "EditConfig":
        """Few-step preset of Inverse-and-Edit (its ``configs/consistency.yaml``) for consistency models:
        the cfg guider's scale is the guidance-scale embedding's w per step (0, 7, 11, 19), 'up'
        features 0.5 and self-attention maps 20000 after the first step, range rescaler (0, 1).
        Written for 4 steps (the reverse LoRA's boundaries); ``num_steps`` must be 4."""
        return cls._consistency_preset("consistency", num_steps, (0.0, 7.0, 11.0, 19.0), 20000.0, match_colors=True)

    @classmethod
    def shapes_consistency(cls, num_steps: int = CONSISTENCY_STEPS) -> "EditConfig":
        """Few-step preset for the bundled ``shapes-v1`` model's consistency models (ours): the
        ``consistency`` preset's guiders with the guidance scale of ``shapes`` (w = 3, i.e. CFG 4)
        after a first unguided step and a 20× smaller self-attention scale (1000): the authors'
        20000 held every edit back on this model. Chosen on 24 tuning edits disjoint from the quality
        benchmark's (benchmarks/quality/consistency_preset/README.md), where the authors' colour
        matching of the output held background edits back (4 of 8 succeeded matched, 7 of 8 on the
        plain decode), so this preset leaves it off (``match_colors=False``). ``num_steps`` must be 4."""
        return cls._consistency_preset("shapes_consistency", num_steps, (0.0, 3.0, 3.0, 3.0), 1000.0, match_colors=False)

    @classmethod
    def _consistency_preset(
        cls, name: str, num_steps: int, w: tuple[float, ...], self_attn: float, match_colors: bool
    ) -> "EditConfig":
        """The shape both consistency presets share: guidance-embedding w per step, 'up' features 0.5
        every step, self-attention maps ``self_attn`` after the first step, range rescaler (0, 1);
        4 steps only (the consistency model's boundaries)."""
        if num_steps != CONSISTENCY_STEPS:
            raise ConfigError(f"the {name} preset is written for {CONSISTENCY_STEPS} steps (the consistency "
                              f"model's boundaries), got num_steps={num_steps}")
        return cls(
            guiders=(
                CfgGuider(scale=w),
                FeaturesMapL2(scale=0.5, block="up"),
                SelfAttnMapL2(scale=(0.0, self_attn, self_attn, self_attn)),
            ),
            rescale=RescaleConfig("range_other_on_cfg_norm", 0.0, 1.0),
            num_steps=num_steps,
            match_colors=match_colors,
        )

    @classmethod
    def preset(cls, name: str, num_steps: int | None = None) -> "EditConfig":
        """The named preset (one of :data:`ALL_PRESET_NAMES`) for ``num_steps`` steps (None: the
        preset's own count, :data:`PRESET_STEPS` or :data:`CONSISTENCY_STEPS`)."""
        if name not in ALL_PRESET_NAMES:
            raise ConfigError(f"preset {name!r} is unknown; choose one of {list(ALL_PRESET_NAMES)}")
        if num_steps is None:
            num_steps = CONSISTENCY_STEPS if name in CONSISTENCY_PRESET_NAMES else PRESET_STEPS
        return getattr(cls, name)(num_steps)

    def with_steps(self, num_steps: int) -> "EditConfig":
        """This config for another step count (only when no per-step lists pin the length)."""
        return replace(self, num_steps=num_steps)

    # --- the authors' YAML format ------------------------------------------------------------

    @classmethod
    def from_yaml(cls, source: str | Path) -> "EditConfig":
        """Load a config in the authors' YAML format (``guiders: [{name: cfg, g_scale: 7.5, ...}]``).

        ``source`` is a path or a YAML string.
        """
        text = source
        if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config is not valid YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a YAML mapping with a 'guiders' list, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping) -> "EditConfig":
        """Build a config from the authors' dict format (what :meth:`from_yaml` parses)."""
        known = {
            "guiders", "noise_rescaling_setup", "self_attn_layers_num", "scheduler_type", "inversion_type",
            "model_name", "pipeline_type", "start_latent", "verbose", "edit_types", "gradient_checkpointing",
            "num_steps", "align_inversion", "match_colors",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        if data.get("inversion_type", "dummy") != "dummy":
            raise ConfigError(
                f"inversion_type {data['inversion_type']!r} is not supported; gnr-fast uses plain DDIM inversion "
                "('dummy'), as the paper's GaR configs do"
            )
        if data.get("start_latent", "inversion") != "inversion":
            raise ConfigError(f"start_latent {data['start_latent']!r} is not supported; use 'inversion'")
        num_steps = _steps_from(data)
        guiders_data = data.get("guiders")
        if not isinstance(guiders_data, Sequence) or isinstance(guiders_data, (str, bytes)):
            raise ConfigError("config needs a 'guiders' list, e.g. [{name: cfg, g_scale: 7.5}]")
        guiders = tuple(_guider_from_dict(g, num_steps) for g in guiders_data)
        rescale_data = data.get("noise_rescaling_setup", {"type": "identity_rescaler"})
        if not isinstance(rescale_data, Mapping) or "type" not in rescale_data:
            raise ConfigError("noise_rescaling_setup must be a mapping with a 'type'")
        bounds = rescale_data.get("init_setup", (1.0, 1.0))
        if isinstance(bounds, (int, float)) or not isinstance(bounds, Sequence) or len(bounds) != 2:
            raise ConfigError(f"noise_rescaling_setup.init_setup must be [lo, hi], got {bounds!r}")
        rescale = RescaleConfig(rescale_data["type"], bounds[0], bounds[1])
        layers = data.get("self_attn_layers_num")
        if layers is not None:
            if not isinstance(layers, Sequence) or len(layers) != 3:
                raise ConfigError(f"self_attn_layers_num must have 3 entries (down, mid, up), got {layers!r}")
            layers = tuple(_layer_range(x, layers) for x in layers)
        return cls(
            guiders=guiders,
            rescale=rescale,
            num_steps=num_steps,
            self_attn_layers=layers,
            align_inversion=data.get("align_inversion", "reference"),
            match_colors=data.get("match_colors", True),
        )


def _layer_range(entry: object, layers: object) -> tuple[int, ...]:
    """One self_attn_layers_num entry: a count n (layers 0..n) or a [start, end] pair of integers."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return (0, entry)
    if (
        isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)) and len(entry) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
    ):
        return tuple(entry)
    raise ConfigError(f"self_attn_layers_num entries must be a count or a [start, end] pair, got {entry!r} in {layers!r}")


def _steps_from(data: Mapping) -> int:
    if "num_steps" in data:
        return data["num_steps"]
    scheduler_type = str(data.get("scheduler_type", "ddim_50_eps"))
    parts = scheduler_type.split("_")
    if len(parts) != 3 or parts[0] != "ddim" or not parts[1].isdigit():
        raise ConfigError(f"scheduler_type {scheduler_type!r} is not supported; use 'ddim_<steps>_eps' or 'ddim_<steps>_v'")
    return int(parts[1])


def _guider_from_dict(entry: object, num_steps: int) -> GuiderConfig:
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise ConfigError(f"each guider must be a mapping with a 'name', got {entry!r}")
    name = entry["name"]
    cls = guider_type(name)
    kwargs = entry.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"guider {name!r}: kwargs must be a mapping, got {kwargs!r}")
    try:
        return cls.from_kwargs(entry.get("g_scale", 1.0), dict(kwargs), num_steps)
    except KeyError as exc:
        raise ConfigError(f"guider {name!r} is missing the required kwarg {exc.args[0]!r}") from exc
    except TypeError as exc:
        raise ConfigError(f"guider {name!r} got unexpected kwargs: {exc}") from exc
