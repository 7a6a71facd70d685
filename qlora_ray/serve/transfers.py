"""Copies between the host and the device that never make the host wait for the work queued before them.

A copy to or from pageable host memory, which is what `torch.tensor(values, device=...)`,
`.to(device)` and `.tolist()` make, synchronizes the CUDA stream: the host waits until every step
queued before it has run. In a step loop that queues the next decode step before it reads the last
one's tokens back (serve/scheduler.py), such a copy empties the queue and lets the device sit idle
while the host hands tokens out; and while the host waits, the replica's event loop takes the GIL,
which the step thread then waits to get back. Through pinned memory the copies are queued on the
stream like kernels, and a read-back waits for its own copy only.
"""

from __future__ import annotations

import torch


def to_device(values: torch.Tensor | list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a host tensor or a list) on `device`, queued behind the stream's work rather than
    waiting for it. The pinned buffer is not reused before the copy has run: PyTorch's pinned-memory
    allocator records the copy's stream on it."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """Device tensors on their way to the host: the copies are queued where the object is made, so
    work queued after it (the next decode step) does not delay `lists()`, which waits for these
    copies only."""

    def __init__(self, tensors: list[torch.Tensor | None]):
        self._ready = None
        self._host: list[torch.Tensor | None] = []
        devices = {tensor.device for tensor in tensors if tensor is not None and tensor.device.type == "cuda"}
        if len(devices) > 1:
            raise ValueError(f"the tensors to copy are on several devices: {sorted(map(str, devices))}")
        for tensor in tensors:
            if tensor is not None and tensor.device.type == "cuda":
                tensor = tensor.to("cpu", non_blocking=True)  # into pinned memory
            self._host.append(tensor)
        if devices:
            # On the stream the copies ran on: that of their device, which need not be the current one.
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(devices.pop()))

    def lists(self) -> list[list | None]:
        """Each tensor's values as a list (None for None), once its copy is done."""
        if self._ready is not None:
            self._ready.synchronize()
        return [None if tensor is None else tensor.tolist() for tensor in self._host]
