"""Serving tests run torch on one thread (the servers they start do too): the CI machine is small
and shared, and oversubscribed threads make CPU edits many times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
