"""graphrt.host_copy.to_device: values, and (on a GPU) that the host never waits for the stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphrt.host_copy import to_device


def test_values_dtypes_and_non_contiguous_input() -> None:
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    for host in (a, a.T, a[:, ::2], torch.from_numpy(a)):
        out = to_device(host, torch.device("cpu"))
        assert out.dtype == torch.int64
        assert torch.equal(out, torch.as_tensor(np.asarray(host)))
    f = to_device(np.array([0.5, 2.0], dtype=np.float32), torch.device("cpu"))
    assert f.dtype == torch.float32 and f.tolist() == [0.5, 2.0]


@pytest.mark.gpu
def test_gpu_copy_does_not_wait_for_the_stream() -> None:
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    host = np.arange(4096, dtype=np.int64)
    torch.cuda._sleep(500_000_000)  # keeps the stream busy for a few hundred milliseconds
    out = to_device(host, dev)
    # A copy from pageable memory would have waited for the sleep; this one is only queued.
    assert not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), torch.from_numpy(host))
    # The pinned block is reused only after its copy: a second upload gets the right values.
    out2 = to_device(host[::-1].copy(), dev)
    assert torch.equal(out2.cpu(), torch.from_numpy(host[::-1].copy()))
