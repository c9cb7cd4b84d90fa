"""Classifier-free guidance, the one CFG-kind guider: Δcfg = w · (ε_trg − ε_u) (DESIGN.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .registry import GuiderConfig, GuiderKind, register_guider
from .scales import Schedule


@register_guider
@dataclass(frozen=True)
class CfgGuider(GuiderConfig):
    """Classifier-free guidance w · (ε_trg − ε_u) (or ε_src with ``is_source_guidance``)."""

    name: ClassVar[str] = "cfg"
    kind: ClassVar[GuiderKind] = GuiderKind.CFG
    scale: Schedule = 7.5
    is_source_guidance: bool = False

    @classmethod
    def from_kwargs(cls, scale: Schedule, kwargs: dict[str, Any], num_steps: int) -> CfgGuider:
        return cls(scale=scale, is_source_guidance=bool(kwargs.pop("is_source_guidance", False)), **kwargs)
