"""The fast execution path: planned calls, chunked energies, cached source internals (DESIGN.md §8, §9)."""

from .plan import StepPlan, plan_edit, plan_step
from .source_cache import SourceCache
from .step import batch_step, fast_step

__all__ = ["SourceCache", "StepPlan", "batch_step", "fast_step", "plan_edit", "plan_step"]
