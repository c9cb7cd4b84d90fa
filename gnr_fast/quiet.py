"""Third-party log messages that say nothing to a gnr-fast user, filtered by exact logger and text.

Only the messages listed in :data:`NOISE` are dropped, and only from the loggers that emit them,
while gnr-fast runs the code that triggers them (:func:`third_party_noise_filtered`); every other
message of every library still shows. A dropped record is kept: ``gnr-fast --verbose`` calls
:func:`show_third_party_noise`, which replays the records dropped so far (some come from importing
gnr-fast, before the command line is read) and stops filtering.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    """A message one third-party logger emits that gnr-fast hides: the logger's name and a pattern
    matched against the whole formatted message."""

    logger: str
    pattern: re.Pattern[str]
    why: str  # why it says nothing to a gnr-fast user

    def matches(self, record: logging.LogRecord) -> bool:
        return record.name == self.logger and self.pattern.fullmatch(record.getMessage()) is not None


NOISE: tuple[Noise, ...] = (
    Noise(
        "torch._library.triton",
        re.compile(re.escape("Triton not available, find_triton_kernels = []")),
        "torch says so once per torch.library.triton_op registered without triton (three gnr-fast ops); "
        "gnr-fast picks the native or torch implementation then, and `gnr-fast doctor` reports triton",
    ),
    Noise(
        "diffusers.models.modeling_utils",
        re.compile(r"There are modules in \w+ that should be kept in float32: .*", re.DOTALL),
        "diffusers says so whenever a model is cast with .to(dtype); gnr-fast's loader casts the VAE to the "
        "dtype of its precision policy on purpose (docs/precision.md)",
    ),
)
"""Every third-party message gnr-fast hides (a new one is added here, with its reason)."""


class _State:
    shown = False  # set by show_third_party_noise (gnr-fast --verbose)
    dropped: list[logging.LogRecord] = []  # replayed by show_third_party_noise


MAX_KEPT = 100
"""Dropped records kept for a later replay (the oldest are forgotten first)."""


class NoiseFilter(logging.Filter):
    """Drops the records :data:`NOISE` lists (keeping them for a replay) unless noise is shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _State.shown or not any(noise.matches(record) for noise in NOISE):
            return True
        _State.dropped = [*_State.dropped[-(MAX_KEPT - 1):], record]
        return False


_FILTER = NoiseFilter()


@contextmanager
def third_party_noise_filtered() -> Iterator[None]:
    """Hide the :data:`NOISE` messages logged while the block runs (the filter is removed after it)."""
    loggers = [logging.getLogger(name) for name in sorted({noise.logger for noise in NOISE})]
    added = [logger for logger in loggers if _FILTER not in logger.filters]
    for logger in added:
        logger.addFilter(_FILTER)
    try:
        yield
    finally:
        for logger in added:
            logger.removeFilter(_FILTER)


def show_third_party_noise() -> None:
    """Stop hiding :data:`NOISE` and re-emit, through their loggers, the records hidden so far."""
    _State.shown = True
    dropped, _State.dropped = _State.dropped, []
    for record in dropped:
        logging.getLogger(record.name).handle(record)
