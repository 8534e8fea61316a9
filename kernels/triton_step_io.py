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

from graphrt.kernels.pdl import launch_options, pdl_enter

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


@triton.jit
def _decode_gather_kernel(
    token_buf_ptr,
    table_ptr,
    slots_ptr,
    pos_ptr,
    seq_lens_ptr,
    ids_ptr,
    page_rows_ptr,
    locs_ptr,
    lens_ptr,
    width,
    stride_table,
    stride_rows,
    PAGE_SIZE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    table_row = table_ptr + slot * stride_table
    tl.store(ids_ptr + b, tl.load(token_buf_ptr + slot))
    page = tl.load(table_row + pos // PAGE_SIZE).to(tl.int64)
    tl.store(locs_ptr + b, page * PAGE_SIZE + pos % PAGE_SIZE)
    tl.store(lens_ptr + b, tl.load(seq_lens_ptr + b).to(tl.int32))
    w = tl.arange(0, BLOCK_W)
    for w0 in range(0, width, BLOCK_W):
        m = w0 + w < width
        row = tl.load(table_row + w0 + w, mask=m)
        tl.store(page_rows_ptr + b.to(tl.int64) * stride_rows + w0 + w, row, mask=m)


def decode_gather(
    token_buf: torch.Tensor,
    page_table: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`graphrt.kernels.reference.decode_gather` in one kernel (one program per row),
    where torch takes nine: a decode graph's prologue was ~13 us of small kernels at batch 1 on
    an H100. Capturable."""
    bsz = slots.shape[0]
    width = page_table.shape[1]
    dev = slots.device
    input_ids = torch.empty(bsz, dtype=token_buf.dtype, device=dev)
    page_rows = torch.empty(bsz, width, dtype=page_table.dtype, device=dev)
    kv_locs = torch.empty(bsz, dtype=torch.int64, device=dev)
    lens = torch.empty(bsz, dtype=torch.int32, device=dev)
    if bsz == 0:
        return input_ids, page_rows, kv_locs, lens
    for name, x in (("slots", slots), ("positions", positions), ("seq_lens", seq_lens)):
        if x.dim() != 1 or x.stride(0) != 1:
            raise ValueError(f"decode_gather needs a unit-stride 1-D {name}")
    if page_table.stride(1) != 1 or token_buf.dim() != 1:
        raise ValueError("decode_gather needs unit-stride page-table rows and a 1-D token buffer")
    _decode_gather_kernel[(bsz,)](
        token_buf, page_table, slots, positions, seq_lens, input_ids, page_rows, kv_locs, lens,
        width, page_table.stride(0), page_rows.stride(0),
        PAGE_SIZE=page_size, BLOCK_W=min(1024, triton.next_power_of_2(width)), USE_PDL=pdl,
        num_warps=1, **launch_options(pdl),
    )  # fmt: skip
    return input_ids, page_rows, kv_locs, lens
