"""Host-to-device copies that do not wait for the GPU.

`tensor.to("cuda")` from ordinary (pageable) host memory is a blocking copy: the host waits until
the GPU has finished everything queued before it. In the engine's hot path that turned every small
list of ids or positions into a stall (H200, 48 streams of 7b-shape: ~2400 host syncs in 4 s, most
of them these copies; `scaling_bench/step_profile.py --sync-sites`). `to_device` stages the data
in pinned memory and copies it asynchronously instead: the host goes on queueing work, and torch's
pinned-memory allocator keeps the staging buffer alive until the copy has run.
"""

from __future__ import annotations

from typing import Sequence

import torch


def to_device(data: torch.Tensor | Sequence, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`data` (a tensor anywhere, or a nested list of numbers) on `device` as `dtype`, without a
    host sync when it crosses from the host to a GPU. May return `data` itself when nothing changes.
    A host tensor that is already pinned is copied from in place: leave it unchanged until the
    copy has run (any other host data is first copied into a staging buffer of its own)."""
    device = torch.device(device)
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)  # on whichever side it is: for host data, before the copy
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
