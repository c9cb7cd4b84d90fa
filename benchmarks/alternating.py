"""Side-by-side timing: warm-up, then several rounds with the variants alternated (A B A B …).

On a shared, noisy machine a variant timed in one block and the other in a later block measure
two different machine states; alternating them round by round spreads any drift over both, and
the spread of each variant's samples (min–max) shows how far a ratio can be trusted. Every
ratio in the tables is the ratio of the two medians of one such run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass
class Samples:
    """Wall-clock seconds of the timed rounds of one variant (warm-up rounds excluded)."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def low(self) -> float:
        return min(self.seconds)

    @property
    def high(self) -> float:
        return max(self.seconds)

    def describe(self, unit: str = "s") -> str:
        """'1.234 s (1.200–1.300, 3 rounds)': median, then the range of the rounds."""
        if len(self.seconds) == 1:
            return f"{self.median:.3f} {unit} (1 round)"
        return f"{self.median:.3f} {unit} ({self.low:.3f}–{self.high:.3f}, {len(self.seconds)} rounds)"


def ratio(numerator: Samples, denominator: Samples) -> float:
    """median(numerator) / median(denominator), both from the same alternated run."""
    return numerator.median / denominator.median


def alternate(
    variants: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    before_each: Callable[[str], object] | None = None,
) -> dict[str, Samples]:
    """Time each variant ``rounds`` times, interleaved, after ``warmup`` untimed calls of each.

    Round r runs the variants in their given order when r is even and in reverse order when r is
    odd (A B, B A, A B, …), so neither variant always runs right after the other. ``before_each``
    (untimed) is called with the variant's name before each call, e.g. to reset a cache.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    names = list(variants)
    samples = {name: Samples() for name in names}
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else reversed(names):
            if before_each is not None:
                before_each(name)
            start = time.perf_counter()
            variants[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                samples[name].seconds.append(elapsed)
    return samples
