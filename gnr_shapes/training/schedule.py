"""Learning-rate schedules shared by the training scripts."""

from __future__ import annotations

import datetime as dt
import math
import time


def warmup_cosine_lr(step: int, peak_lr: float, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps to ``peak_lr``, then cosine decay to
    ``floor * peak_lr`` at ``total`` steps (held there afterwards)."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class TimeBudget:
    """Fits a step budget to a wall-clock deadline.

    ``total(step)`` re-estimates, from the throughput measured since construction, how many steps
    fit before ``deadline`` (epoch seconds) and returns ``min(max_steps, that)``; with no deadline
    it returns ``max_steps``. ``expired()`` says whether the deadline has passed.
    """

    def __init__(self, max_steps: int, deadline: float | None, first_step: int) -> None:
        self.max_steps = max_steps
        self.deadline = deadline
        self._start_time = time.time()
        self._first_step = first_step
        self._total = max_steps

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.deadline is not None and time.time() >= self.deadline

    def total(self, step: int) -> int:
        """The current estimate of the run's final step (re-estimated every 25 steps)."""
        done = step - self._first_step
        if self.deadline is not None and done >= 20 and step % 25 == 0:
            rate = done / max(1e-6, time.time() - self._start_time)
            left = max(0.0, self.deadline - time.time())
            self._total = min(self.max_steps, step + max(1, int(rate * left)))
        return self._total


def parse_deadline(text: str | None) -> float | None:
    """``HH:MM`` (UTC) -> epoch seconds; None stays None.

    The time is today's, or tomorrow's when today's was more than 12 hours ago (a run started at
    22:50 with ``--deadline 00:15`` ends after midnight; a deadline a few minutes past still
    stops a resumed run at once).
    """
    if text is None:
        return None
    hours, minutes = (int(part) for part in text.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    target = now.replace(hour=hours, minute=minutes, second=0, microsecond=0)
    if target < now - dt.timedelta(hours=12):
        target += dt.timedelta(days=1)
    return target.timestamp()
