"""Fixtures shared across the test tree."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: their matmuls gain nothing from threads, and on a busy
    2-core machine OpenMP hand-offs make each forward many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
