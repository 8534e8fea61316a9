"""Host-to-device copies that never wait for the GPU, and device views of pinned memory.

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


class _CudaArray:
    """The ``__cuda_array_interface__`` of pinned host memory, for ``torch.as_tensor``."""

    def __init__(self, t: torch.Tensor) -> None:
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "strides": tuple(s * t.element_size() for s in t.stride()),
            "typestr": {torch.int64: "<i8", torch.int32: "<i4", torch.float32: "<f4"}[t.dtype],
            "data": (t.data_ptr(), False),
            "version": 2,
        }


def device_view(pinned: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over the pinned host tensor ``pinned``: the same memory (unified virtual
    addressing gives it one address on both sides), which kernels read and write over PCIe
    without a copy. The caller keeps ``pinned`` alive as long as the view."""
    if not pinned.is_pinned():
        raise ValueError("device_view needs pinned host memory")
    with torch.cuda.device(device):
        view = torch.as_tensor(_CudaArray(pinned), device=device)
    if view.data_ptr() != pinned.data_ptr():
        raise RuntimeError("device_view: the device view is not the pinned memory itself")
    return view
