"""Serving tests run torch on one thread (the servers they start do too): the CI machine is small
and shared, and oversubscribed threads make CPU edits many times slower."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def serving_threads(one_torch_thread) -> None:
    """Every serving test module runs under :func:`one_torch_thread` (tests/conftest.py)."""
