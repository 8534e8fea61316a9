"""A decode graph's own input load and ids store, through pinned host memory (zero-copy).

Everything a graph step used to enqueue around its replay cost the GPU time between kernels:
the H2D copy of the step's inputs before the graph (+10 us at batch 256 on the H100, whether a
copy-engine copy or a kernel of its own) and the D2H copy of the sampled ids after it (+5 us).
Inside the graph, the same work costs a few microseconds (``benchmarks/step_handoff.py``). So
the graph's first node reads the step's inputs straight from a pinned ring slot over PCIe, and
its last node writes the sampled ids straight into the same slot's ids row. A slot's inputs
are int32 and column-major, so a bucket's columns are one contiguous run: a first version
(int64, row-major, one program per 256 columns) took 10 us to read them at batch 256.

A captured graph's pointers are fixed, but consecutive steps need different slots (the host
fills step n+1's slot while step n may still read its own). The slot is chosen on the device:
``pos`` is a device counter of graph steps; the load reads slot ``pos % R`` and the store,
the graph's last node, writes the ids there, tags the row with ``pos`` and advances it. The host
keeps the same count (``capture.static_buffers.StepIO``), so it knows each step's slot without
reading ``pos``, and checks the tag when it reads the ids: counts that drifted apart (a replay
the host did not count) fail the step loudly instead of handing it another step's ids.

The ring and ids tensors are CUDA views of pinned host memory (``host_copy.device_view``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 256
# Columns per program of the load: four programs at batch 256, each reading 1.5 KB of host
# memory, so the PCIe reads of a step are in flight together.
_BLOCK_COLS = 64


@triton.jit
def _load_inputs_kernel(
    ring_ptr,
    pos_ptr,
    inputs_ptr,
    table_ptr,
    n,
    num_slots,
    stride_slot,
    stride_inputs,
    stride_table,
    ROWS: tl.constexpr,
    ROWS_P2: tl.constexpr,
    UPDATES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A slot is column-major (a column's ROWS values together), so the bucket's n columns are
    # one contiguous run of host memory: few, full PCIe reads.
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = tl.arange(0, ROWS_P2)
    m = (c[:, None] < n) & (r[None, :] < ROWS)
    src = ring_ptr + (tl.load(pos_ptr) % num_slots) * stride_slot
    tile = tl.load(src + c[:, None] * ROWS + r[None, :], mask=m, other=0)
    tl.store(inputs_ptr + r[None, :] * stride_inputs + c[:, None], tile.to(tl.int64), mask=m)
    # The step's page-table writes, from the same columns (slot < 0: no write in this column).
    slot = tl.sum(tl.where(r[None, :] == UPDATES, tile, 0), axis=1)
    col = tl.sum(tl.where(r[None, :] == UPDATES + 1, tile, 0), axis=1)
    page = tl.sum(tl.where(r[None, :] == UPDATES + 2, tile, 0), axis=1)
    w = (c < n) & (slot >= 0)
    tl.store(
        table_ptr + slot.to(tl.int64) * stride_table + col,
        page.to(table_ptr.dtype.element_ty),
        mask=w,
    )


@triton.jit
def _store_ids_kernel(
    ids_ptr, ring_ids_ptr, pos_ptr, n, num_slots, stride_slot, tag_col, BLOCK: tl.constexpr
):
    # One program, so that every thread has read ``pos`` before it is advanced.
    p = tl.load(pos_ptr)
    dst = ring_ids_ptr + (p % num_slots) * stride_slot
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < n
        tl.store(dst + i, tl.load(ids_ptr + i, mask=m), mask=m)
    tl.store(dst + tag_col, p)
    tl.debug_barrier()
    tl.store(pos_ptr, p + 1)


def load_step_inputs(
    ring: torch.Tensor,
    pos: torch.Tensor,
    inputs: torch.Tensor,
    page_table: torch.Tensor,
    n: int,
    updates_row: int,
) -> None:
    """``inputs[:, :n] = ring[pos % R, :n, :].T``, then the page-table writes held in rows
    ``updates_row``, ``+1``, ``+2`` of those columns (slot, column, page; a negative slot: none).

    ``ring``: int32 ``[R, W, ROWS]`` (column-major slots); ``pos``: int64 ``[1]``; ``inputs``:
    int64 ``[ROWS, W]``; ``page_table``: int32 ``[slots, pages_per_seq]``. Capturable.
    """
    if n == 0:
        return
    if ring.stride(2) != 1 or ring.stride(1) != ring.shape[2] or inputs.stride(1) != 1:
        raise ValueError("load_step_inputs needs contiguous ring slots and unit-stride inputs")
    if page_table.stride(1) != 1:
        raise ValueError("load_step_inputs needs unit-stride page-table rows")
    rows = ring.shape[2]
    _load_inputs_kernel[(triton.cdiv(n, _BLOCK_COLS),)](
        ring,
        pos,
        inputs,
        page_table,
        n,
        ring.shape[0],
        ring.stride(0),
        inputs.stride(0),
        page_table.stride(0),
        ROWS=rows,
        ROWS_P2=triton.next_power_of_2(rows),
        UPDATES=updates_row,
        BLOCK=_BLOCK_COLS,
    )


def store_step_ids(ids: torch.Tensor, ring_ids: torch.Tensor, pos: torch.Tensor) -> None:
    """``ring_ids[pos % R, :n] = ids`` and ``ring_ids[pos % R, -1] = pos`` (the tag the host
    checks the step count by), then ``pos += 1``. ``ids``: int64 ``[n]``; ``ring_ids``: int64
    ``[R, W + 1]``, ``W >= n``. Capturable."""
    if ring_ids.stride(1) != 1 or ids.stride(0) != 1:
        raise ValueError("store_step_ids needs unit-stride rows")
    if ids.shape[0] >= ring_ids.shape[1]:
        raise ValueError(f"{ids.shape[0]} ids do not fit a ring row of {ring_ids.shape[1]} - 1")
    _store_ids_kernel[(1,)](
        ids,
        ring_ids,
        pos,
        ids.shape[0],
        ring_ids.shape[0],
        ring_ids.stride(0),
        ring_ids.shape[1] - 1,
        BLOCK=_BLOCK,
    )
