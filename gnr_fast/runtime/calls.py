"""The kinds of UNet call a plan is made of (DESIGN.md §9), shared by the registry and the executor."""

from __future__ import annotations

from enum import Enum


class CallKind(str, Enum):
    """The three kinds of UNet call a plan is made of (DESIGN.md §9)."""

    PLAIN = "plain"  # no grad, no captures: any backend
    CAPTURING = "capturing"  # no grad, returns (ε, captures): the source pass
    GRAD = "grad"  # autograd on, returns (ε, captures) for the energies' backward
