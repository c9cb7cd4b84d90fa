"""Per-step guidance scales: one float for every step, or a tuple with one float per step."""

from __future__ import annotations

import math
from typing import Union

from ..errors import ConfigError

Schedule = Union[float, tuple[float, ...]]


def scale_at(schedule: Schedule, step: int) -> float:
    """The value of ``schedule`` at ``step``."""
    return float(schedule) if isinstance(schedule, (int, float)) else float(schedule[step])


def first_steps(value: float, count: int, num_steps: int) -> tuple[float, ...]:
    """``value`` for the first ``count`` steps, 0 afterwards."""
    return tuple(float(value) if i < count else 0.0 for i in range(num_steps))


def last_steps(value: float, count: int, num_steps: int) -> tuple[float, ...]:
    """``value`` for the last ``count`` steps, 0 before."""
    return tuple(float(value) if i >= num_steps - count else 0.0 for i in range(num_steps))


def check_schedule(schedule: Schedule, what: str) -> Schedule:
    """``schedule`` as a float or a tuple of floats; :class:`ConfigError` naming ``what`` unless it is
    a finite number or a non-empty list of finite numbers."""
    if isinstance(schedule, bool) or not isinstance(schedule, (int, float, tuple, list)):
        raise ConfigError(f"{what} must be a number or a list of numbers, got {schedule!r}")
    values = [schedule] if isinstance(schedule, (int, float)) else list(schedule)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{what} contains {v!r}; scales must be finite numbers")
    if isinstance(schedule, (int, float)):
        return float(schedule)
    if not values:
        raise ConfigError(f"{what} is an empty list; give one number or one per step")
    return tuple(float(v) for v in values)


def schedule_len(schedule: Schedule) -> int | None:
    """The number of per-step values of ``schedule``; ``None`` for one value for every step."""
    return None if isinstance(schedule, float) else len(schedule)
