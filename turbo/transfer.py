"""Host <-> device copies that never make the host wait for the device's queue.

The engine launches step N + 1 while step N still runs on the GPU (engine.py), so no
copy between them may synchronize the stream: torch.tensor(..., device="cuda") and
.tolist() of a CUDA tensor both do (a pageable copy waits for all queued work).
Both directions go through pinned memory asynchronously instead; torch's pinned
allocator keeps each buffer until the copy that uses it is done.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: np.ndarray | list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` as a tensor on `device` (in `dtype`, else the array's or torch's default), copied asynchronously
    through pinned memory on CUDA."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor on its way to the host: started at construction, read with tolist()."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self._host, self._done = tensor, None
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def tolist(self) -> list:
        """The values, once the copy has arrived (waits for it, and for nothing queued after it)."""
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()
