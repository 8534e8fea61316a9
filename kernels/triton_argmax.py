"""Greedy sampling's argmax over the vocabulary, on the logits in their own dtype.

``torch.argmax`` on a ``[B, 128256]`` row block reduces each row in one CTA: 27 us at batch 1 on
the H100, and at batch 256 the fp32 copy of the logits it needs costs more than the argmax
(``benchmarks/step_profile.py``). Here a first kernel reduces ``BLOCK``-wide chunks of every row
in parallel and a second picks each row's winner. Casting bf16 to fp32 is exact and monotone, so
the argmax of the bf16 logits is the argmax of their fp32 copy; ties go to the lowest index, as
``torch.argmax`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphrt.kernels.pdl import launch_options, pdl_enter

_CHUNK = 4096


@triton.jit
def _argmax_chunk_kernel(
    x_ptr, val_ptr, idx_ptr, n, stride_x, n_chunks, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < n, other=float("-inf"))
    x = x.to(tl.float32)
    best, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * n_chunks + chunk, best)
    tl.store(idx_ptr + row * n_chunks + chunk, chunk * BLOCK + at)


@triton.jit
def _argmax_rows_kernel(
    val_ptr, idx_ptr, out_ptr, n_chunks, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    mask = c < n_chunks
    v = tl.load(val_ptr + row * n_chunks + c, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * n_chunks + c, mask=mask, other=2**31 - 1)
    best = tl.max(v, axis=0)
    # Chunks are in index order, so the first chunk holding the maximum has the lowest index.
    first = tl.min(tl.where(v == best, i, 2**31 - 1), axis=0)
    tl.store(out_ptr + row, first.to(tl.int64))


def argmax(logits: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for a ``[B, V]`` tensor: int64 ``[B]``."""
    rows, n = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = min(_CHUNK, triton.next_power_of_2(n))
    n_chunks = triton.cdiv(n, block)
    vals = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows, n_chunks), dtype=torch.int32, device=logits.device)
    _argmax_chunk_kernel[(rows, n_chunks)](
        logits, vals, idx, n, logits.stride(0), n_chunks, BLOCK=block, USE_PDL=pdl,
        num_warps=8, **launch_options(pdl),
    )  # fmt: skip
    _argmax_rows_kernel[(rows,)](
        vals, idx, out, n_chunks, BLOCK_C=triton.next_power_of_2(n_chunks), USE_PDL=pdl,
        num_warps=1, **launch_options(pdl),
    )  # fmt: skip
    return out
