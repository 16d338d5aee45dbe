"""One intra-op thread for the in-process sharding tests: their tensors are tiny, and on a
shared 2-core machine a thread pool only adds contention (the spawned ranks pin 1 too)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
