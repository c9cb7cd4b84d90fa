"""Self-attention map L2 energy: Σ_layers mean((A_cur − A_inv)²) (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention.capture import CaptureMode, PassCapture
from ..ops.attn_map_energy import attn_map_energy
from ..precision import to_compute
from .registry import GuiderConfig, GuiderKind, Role, register_guider
from .scales import scale_at


def self_attn_map_l2(cur: PassCapture, inv: PassCapture, layers: frozenset[int]) -> torch.Tensor:
    """Sum over ``layers`` of the mean squared difference of the two passes' attention maps.

    With :attr:`CaptureMode.MAPS` captures the maps are compared directly (the reference
    formula); with :attr:`CaptureMode.QK` captures the chunked op recomputes them tile by tile
    from (Q, K) and the source pass's log-sum-exp without materialising any N×N map.
    Either way the energy is a 0-dim float32 tensor (float64 for float64 inputs) whatever the
    capture dtype (docs/precision.md).
    """
    total: torch.Tensor | None = None
    for index in sorted(layers):
        if cur.mode is CaptureMode.MAPS:
            term = torch.mean((to_compute(cur.maps[index]) - to_compute(inv.maps[index])) ** 2)
        else:
            term = attn_map_energy(
                cur.queries[index],
                cur.keys[index],
                inv.queries[index],
                inv.keys[index],
                inv.lse[index],
                scale=cur.scales.get(index),
            )
        total = term if total is None else total + term
    if total is None:
        raise ValueError("self_attn_map_l2 needs at least one selected self-attention layer")
    return total


@register_guider
@dataclass(frozen=True)
class SelfAttnMapL2(GuiderConfig):
    """Σ_layers mean((A_cur − A_inv)²) over self-attention maps; pair (cur_inv, inv_inv)."""

    name: ClassVar[str] = "self_attn_map_l2"
    kind: ClassVar[GuiderKind] = GuiderKind.ENERGY
    reads: ClassVar[tuple[Role, ...]] = (Role.CUR_INV, Role.INV_INV)
    reads_attention: ClassVar[bool] = True

    def energy(self, step: int, captures: Mapping[Role, PassCapture], layers: frozenset[int]) -> torch.Tensor:
        return scale_at(self.scale, step) * self_attn_map_l2(captures[Role.CUR_INV], captures[Role.INV_INV], layers)
