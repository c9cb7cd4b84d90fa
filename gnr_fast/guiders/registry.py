"""The guider seam: what a guider is, and the one registry every part of the engine reads.

A guider is a frozen config dataclass that also knows how it acts (DESIGN.md §3, §4):

* its :class:`GuiderKind` — the CFG term, an *energy* (its gradient ∂E/∂z is rescaled and added)
  or a *direct* noise term;
* the passes it reads (:class:`Role`) and what those passes must record for it: the
  self-attention maps of the selected layers (``reads_attention``) and its feature sites;
* its per-step weight, its energy (or direct term), and how it is written in the authors' YAML.

The YAML parser (:mod:`gnr_fast.config`), the planner (:mod:`gnr_fast.fast.plan`), the fast step
and the reference step ask the guiders through the functions below; none of them names a guider.
A new guider is one module: a :class:`GuiderConfig` subclass decorated with
:func:`register_guider` (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, TypeVar

import torch

from ..attention.sites import FeatureSite
from ..errors import ConfigError
from .scales import Schedule, check_schedule, scale_at, schedule_len

if TYPE_CHECKING:
    from ..attention.capture import PassCapture


class Role(str, Enum):
    """Which UNet pass a guider reads (DESIGN.md §3): latent × prompt."""

    CUR_INV = "cur_inv"  # current latent z_t, source prompt; gradient flows to z_t
    INV_INV = "inv_inv"  # inversion latent z*_t, source prompt; constant
    CUR_TRG = "cur_trg"  # current latent z_t, target prompt; gradient flows to z_t


class GuiderKind(Enum):
    """How a guider's output enters ε_final = ε_u + Δcfg + γ · ∂E/∂z + direct (DESIGN.md §3)."""

    CFG = "cfg"  # Δcfg = w · (ε_prompt − ε_u): exactly one per edit; the rescaler's reference norm
    ENERGY = "energy"  # E from the captures of the passes it reads; its gradient is rescaled by γ
    DIRECT = "direct"  # a noise term added as is (no backward, not rescaled)


class Guider(Protocol):
    """What the engine asks of a guider (:class:`GuiderConfig` implements the defaults)."""

    name: ClassVar[str]  # its YAML name; unique in the registry
    kind: ClassVar[GuiderKind]
    reads: ClassVar[tuple[Role, ...]]  # the passes an energy compares
    reads_attention: ClassVar[bool]  # whether those passes record the selected layers' attention
    scale: Schedule  # v_g(i), the per-step weight of its output

    @property
    def feature_sites(self) -> frozenset[FeatureSite]:
        """The UNet module outputs the passes it reads must record."""
        ...

    def schedules(self) -> dict[str, Schedule]:
        """Every per-step schedule it holds, by YAML field name (for length checks)."""
        ...

    def is_active(self, step: int) -> bool:
        """Whether it contributes anything at ``step``."""
        ...

    def energy(self, step: int, captures: Mapping[Role, PassCapture], layers: frozenset[int]) -> torch.Tensor:
        """ENERGY kind: v_g(step) · E_g from the captures of the passes it reads, a 0-dim tensor."""
        ...

    def noise(self, step: int, z: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
        """DIRECT kind: the noise term it adds at ``step`` for latent ``z`` paired with ``z_star``."""
        ...

    def check_rescale(self, rescale_kind: str) -> None:
        """Raise :class:`ConfigError` if it cannot run under the noise rescaler ``rescale_kind``."""
        ...


@dataclass(frozen=True)
class GuiderConfig:
    """Base of the guider configs; ``scale`` multiplies the guider's output at each step.

    Subclasses set the class attributes of :class:`Guider`, add their fields, and override
    :meth:`energy` (ENERGY kind), :meth:`noise` (DIRECT kind) or :meth:`from_kwargs` (YAML kwargs
    that are not plain fields) as they need.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[GuiderKind] = GuiderKind.DIRECT
    reads: ClassVar[tuple[Role, ...]] = ()
    reads_attention: ClassVar[bool] = False
    scale: Schedule = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_schedule(self.scale, f"{self.name}.g_scale"))

    @property
    def feature_sites(self) -> frozenset[FeatureSite]:
        return frozenset()

    def schedules(self) -> dict[str, Schedule]:
        return {"g_scale": self.scale}

    def is_active(self, step: int) -> bool:
        """Whether this guider contributes anything at ``step`` (some scale is non-zero)."""
        return scale_at(self.scale, step) != 0.0

    def energy(self, step: int, captures: Mapping[Role, PassCapture], layers: frozenset[int]) -> torch.Tensor:
        raise TypeError(f"{self.name} is not an energy guider")

    def noise(self, step: int, z: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.name} adds no direct noise term")

    def check_rescale(self, rescale_kind: str) -> None:
        return None

    @classmethod
    def from_kwargs(cls, scale: Schedule, kwargs: dict[str, Any], num_steps: int) -> GuiderConfig:
        """The guider a YAML entry ``{name, g_scale: scale, kwargs: kwargs}`` describes for an edit of
        ``num_steps`` steps. A missing required kwarg raises ``KeyError``, an unexpected one
        ``TypeError`` (the parser turns both into :class:`ConfigError`)."""
        return cls(scale=scale, **kwargs)


G = TypeVar("G", bound=type)

GUIDERS: dict[str, type] = {}
"""The registry: guider name → its config class (filled by :func:`register_guider`)."""


def register_guider(cls: G) -> G:
    """Class decorator: make ``cls`` (a :class:`Guider`) known to the YAML parser and the engine under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered as a guider")
    if not isinstance(getattr(cls, "kind", None), GuiderKind):
        raise ValueError(f"guider {name!r} needs a class attribute 'kind' (a GuiderKind)")
    if GUIDERS.get(name, cls) is not cls:
        raise ValueError(f"a guider named {name!r} is already registered ({GUIDERS[name].__name__})")
    GUIDERS[name] = cls
    return cls


def unregister_guider(name: str) -> None:
    """Forget the guider registered as ``name`` (a no-op when none is)."""
    GUIDERS.pop(name, None)


def guider_type(name: object) -> type:
    """The config class registered as ``name``; :class:`ConfigError` listing the known names otherwise."""
    if not isinstance(name, str) or name not in GUIDERS:
        raise ConfigError(f"guider {name!r} is unknown; known guiders: {sorted(GUIDERS)}")
    return GUIDERS[name]


def check_guiders(guiders: Sequence[Guider], num_steps: int, rescale_kind: str) -> None:
    """Raise :class:`ConfigError` unless ``guiders`` form a valid edit of ``num_steps`` steps under the
    rescaler ``rescale_kind``: registered guiders, each once, per-step schedules of the edit's
    length, exactly one CFG-kind guider, each accepting the rescaler."""
    if not guiders:
        raise ConfigError("an edit needs at least one guider (e.g. cfg)")
    names = [getattr(g, "name", None) for g in guiders]
    for g, name in zip(guiders, names):
        if GUIDERS.get(name) is not type(g):
            raise ConfigError(f"guiders must be registered guider configs (GuiderConfig objects), got {type(g).__name__}")
        if names.count(name) > 1:
            raise ConfigError(f"guider {name!r} is listed twice")
        for key, schedule in g.schedules().items():
            length = schedule_len(schedule)
            if length is not None and length != num_steps:
                raise ConfigError(
                    f"{name}.{key} has {length} per-step values but the edit runs {num_steps} steps; give "
                    f"one value per step or a single number"
                )
    cfg = [g for g in guiders if g.kind is GuiderKind.CFG]
    if not cfg:
        raise ConfigError("the cfg guider is required (noise rescaling is relative to the CFG term)")
    if len(cfg) > 1:
        raise ConfigError(f"an edit takes one CFG guider, got {[g.name for g in cfg]}")
    for g in guiders:
        g.check_rescale(rescale_kind)


def cfg_guider(guiders: Iterable[Guider]) -> Any:
    """The edit's CFG-kind guider (:func:`check_guiders` makes sure there is exactly one)."""
    return next(g for g in guiders if g.kind is GuiderKind.CFG)


def energy_guiders(guiders: Iterable[Guider]) -> tuple[Guider, ...]:
    """The ENERGY-kind guiders, in config order."""
    return tuple(g for g in guiders if g.kind is GuiderKind.ENERGY)


def direct_guiders(guiders: Iterable[Guider]) -> tuple[Guider, ...]:
    """The DIRECT-kind guiders, in config order."""
    return tuple(g for g in guiders if g.kind is GuiderKind.DIRECT)


class CaptureNeed(NamedTuple):
    """What a pass must record for the guiders reading it."""

    attention: bool  # the selected layers' self-attention (maps, or Q/K and lse)
    feature_sites: frozenset[FeatureSite]


def capture_need(guiders: Iterable[Guider], roles: Iterable[Role | None]) -> CaptureNeed:
    """What the passes of ``roles`` must record for those of ``guiders`` that read any of them."""
    wanted = set(roles)
    readers = [g for g in guiders if wanted & set(g.reads)]
    return CaptureNeed(
        attention=any(g.reads_attention for g in readers),
        feature_sites=frozenset(site for g in readers for site in g.feature_sites),
    )
