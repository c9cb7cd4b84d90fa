"""The one path chooser of the ops (gnr_fast/ops/path_choice.py): preference order, forcing, the
fallback, and one log line per distinct choice."""

from __future__ import annotations

import logging

import pytest

from gnr_fast.errors import BackendUnavailableError
from gnr_fast.ops.path_choice import choose_path, forget_logged_choices

LOGGER = logging.getLogger("gnr_fast.tests.path_choice")
ASKED: list[tuple[str, bool]] = []  # (path, forced) of every predicate call


def predicate(name: str, reason: str | None, reason_unforced: str | None = None):
    def reason_of(forced: bool) -> str | None:
        ASKED.append((name, forced))
        return reason if forced or reason_unforced is None else reason_unforced
    return reason_of


def test_auto_takes_the_first_supported_path_and_says_what_it_passed_over(caplog):
    forget_logged_choices()
    ASKED.clear()
    paths = [("fast", predicate("fast", "no GPU")), ("native", predicate("native", None)), ("other", predicate("other", None))]
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        assert choose_path(LOGGER, "op", "auto", paths) == "native"
        assert choose_path(LOGGER, "op", "auto", paths) == "native"
    assert ASKED == [("fast", False), ("native", False)] * 2  # "other" is never asked
    assert [r.getMessage() for r in caplog.records] == ["op uses the native path (fast: no GPU)"]


def test_forcing_a_path_asks_only_it_and_names_why_it_cannot_run():
    ASKED.clear()
    paths = [("fast", predicate("fast", None, reason_unforced="tests only")), ("native", predicate("native", "not built"))]
    assert choose_path(LOGGER, "op", "auto", paths) == "torch"  # "fast" runs only when forced
    assert choose_path(LOGGER, "op", "fast", paths) == "fast"
    with pytest.raises(BackendUnavailableError, match="op: backend='native' is unavailable: not built"):
        choose_path(LOGGER, "op", "native", paths)
    assert ASKED == [("fast", False), ("native", False), ("fast", True), ("native", True)]


def test_the_fallback_always_runs(caplog):
    forget_logged_choices()
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        assert choose_path(LOGGER, "op", "sdpa", [("fast", predicate("fast", None))], fallback="sdpa") == "sdpa"
        assert choose_path(LOGGER, "op", "auto", [("fast", predicate("fast", "no GPU"))], fallback="sdpa") == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [
        "op uses the sdpa path (backend='sdpa')", "op uses the sdpa path (fast: no GPU)"]
