"""The fast execution path: planned passes, chunked energies, cached source internals (DESIGN.md §8)."""

from .plan import StepPlan, plan_edit, plan_step
from .source_cache import SourceCache
from .step import fast_step

__all__ = ["SourceCache", "StepPlan", "fast_step", "plan_edit", "plan_step"]
