"""Host-to-device copies that never wait for the GPU.

A copy from pageable host memory is not asynchronous: CUDA first waits for everything already
queued on the stream to finish (the driver stages pageable memory itself). On the launcher that
would hold step n+1's launch until step n has finished, so every per-step upload (page-table
updates, new requests' sampling parameters, eager-step inputs) goes through pinned memory from
torch's caching host allocator. That allocator hands a block out again only after the copy
that read it has completed (the copy records an event on it), so no ring of buffers is needed.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(host: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``, enqueued on the current stream without a host-side wait."""
    t = torch.from_numpy(np.ascontiguousarray(host)) if isinstance(host, np.ndarray) else host
    if device.type != "cuda":
        return t.to(device)
    return t.contiguous().pin_memory().to(device, non_blocking=True)
