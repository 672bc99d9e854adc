"""turbo/transfer.py: host <-> device copies that give the right values and, on CUDA, never wait for the
work queued before them (the overlapped engine launches a step while the last one still runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcompress.turbo.transfer import HostCopy, to_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_values_and_dtypes_survive_the_round_trip_on_the_cpu():
    values = to_device(np.array([3, -1, 7], dtype=np.int32), torch.device("cpu"))
    assert values.dtype == torch.int32 and values.tolist() == [3, -1, 7]  # the array's dtype
    assert to_device([3, -1], torch.device("cpu"), torch.int64).dtype == torch.int64
    assert HostCopy(torch.tensor([1.5, 2.5])).tolist() == [1.5, 2.5]


@needs_cuda
def test_copies_do_not_wait_for_queued_device_work():
    device = torch.device("cuda")
    HostCopy(to_device(list(range(1000)), device, torch.int64) * 2).tolist()  # the steady state: pinned blocks cached
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles queued ahead of the copies
    busy = torch.cuda.Event()
    busy.record()
    ids = to_device(list(range(1000)), device, torch.int64)
    tokens = HostCopy(ids * 2)
    assert not busy.query(), "the copies waited for the queued work"  # the host got here while it runs
    assert tokens.tolist() == [2 * i for i in range(1000)]  # and tolist() waits for exactly that
    assert busy.query()
