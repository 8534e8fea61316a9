"""Page-table writes of a decode step, from rows of its static inputs.

A decode step that crosses a page boundary for some rows must point those rows' page-table
entries at their new pages before the step reads them. The (slot, column, page) triples ride in
rows of the step's inputs (``capture.static_buffers``); columns whose slot is negative are
empty. A captured decode graph applies them in its first kernel, which also loads the inputs
(``kernels.triton_step_io``); this kernel serves the same step run eagerly, where nothing is
captured (``DecodeGraphRunner.run``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 256


@triton.jit
def _scatter_pages_kernel(table_ptr, upd_ptr, n, stride_table, stride_upd, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    slot = tl.load(upd_ptr + i, mask=m, other=-1)
    m = m & (slot >= 0)
    col = tl.load(upd_ptr + stride_upd + i, mask=m, other=0)
    page = tl.load(upd_ptr + 2 * stride_upd + i, mask=m, other=0)
    tl.store(table_ptr + slot * stride_table + col, page.to(table_ptr.dtype.element_ty), mask=m)


def scatter_page_updates(page_table: torch.Tensor, updates: torch.Tensor) -> None:
    """``page_table[updates[0, i], updates[1, i]] = updates[2, i]`` for every column ``i``
    whose slot ``updates[0, i]`` is not negative.

    ``page_table``: int32 ``[slots, pages_per_seq]``, contiguous rows; ``updates``: int64
    ``[3, n]`` (rows: slot, column, page), unit stride along the last dimension. Capturable:
    no host synchronization, no allocation.
    """
    n = updates.shape[1]
    if n == 0:
        return
    if updates.stride(1) != 1 or page_table.stride(1) != 1:
        raise ValueError("scatter_page_updates needs unit-stride rows")
    grid = (triton.cdiv(n, _BLOCK),)
    _scatter_pages_kernel[grid](
        page_table, updates, n, page_table.stride(0), updates.stride(0), BLOCK=_BLOCK
    )
