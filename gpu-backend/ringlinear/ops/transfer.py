"""Host -> device copies that do not make the host wait.

`tensor.to("cuda")` from ordinary (pageable) host memory synchronises the stream: the host stops until the GPU has
finished all queued work. A step builds its index tensors on the host; copied that way, each one would stall the host
mid-step and leave the GPU idle while the next kernels are queued. Staged through pinned memory, the copy is queued
like a kernel (torch's pinned-memory allocator keeps the staging buffer alive until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t (on the host) on `device`, queued on the current stream without a host sync on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
