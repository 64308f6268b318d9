"""One torch thread for the streaming tests: their tensors are tiny, and on a shared machine intra-op threads
spin against other processes (measured here: 2 threads made a 0.3 s test take 2 to 30 s)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
