"""UNet execution backends behind one calling convention (STYLE.md §10)."""

from .base import UNetRunner
from .eager import EagerUNetRunner

__all__ = ["EagerUNetRunner", "UNetRunner"]
