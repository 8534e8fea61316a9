"""Greedy sampling's argmax over the vocabulary, on the logits in their own dtype.

``torch.argmax`` on a ``[B, 128256]`` row block reduces each row in one CTA: 27 us at batch 1 on
the H100, and at batch 256 the fp32 copy of the logits it needs costs more than the argmax
(``benchmarks/step_profile.py``). Here a first kernel reduces ``BLOCK``-wide chunks of every row
in parallel and a second picks each row's winner. Casting bf16 to fp32 is exact and monotone, so
the argmax of the bf16 logits is the argmax of their fp32 copy; ties go to the lowest index, as
``torch.argmax`` does.

Structured outputs' greedy rows pass their allowed-token bitmasks (int32 ``[B, >= V/32]``,
xgrammar's layout): the first kernel reads each chunk's mask words with its logits and counts a
forbidden token as -inf. The torch way, a masked copy of the logits and then the argmax, moves
about 100 MB at batch 64 over a 128k vocabulary; this reads the logits once. A row that allows
nothing gets index 0, as ``torch.argmax`` on a row of -inf does. ``apply_token_bitmask`` writes
that masked copy in one kernel, for the full sampler, whose later ops need it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphrt.kernels.pdl import launch_options, pdl_enter

_CHUNK = 4096


@triton.jit
def _allowed(m_ptr, row, stride_m, offs, n):
    # Bit offs % 32 of word offs // 32 of the row's bitmask (an arithmetic shift of a negative
    # word still brings the wanted bit down to bit 0).
    words = tl.load(m_ptr + row.to(tl.int64) * stride_m + offs // 32, mask=offs < n, other=0)
    return ((words >> (offs % 32)) & 1) != 0


@triton.jit
def _argmax_chunk_kernel(
    x_ptr,
    m_ptr,
    val_ptr,
    idx_ptr,
    n,
    stride_x,
    stride_m,
    n_chunks,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < n, other=float("-inf"))
    x = x.to(tl.float32)
    if HAS_MASK:
        x = tl.where(_allowed(m_ptr, row, stride_m, offs, n), x, float("-inf"))
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


def _check_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    rows, n = logits.shape
    if masks.dtype != torch.int32 or masks.dim() != 2 or masks.shape[0] != rows:
        raise ValueError(f"token masks: want int32 [{rows}, words], got {masks.dtype} "
                         f"{tuple(masks.shape)}")  # fmt: skip
    if masks.shape[1] * 32 < n:
        raise ValueError(f"token masks: {masks.shape[1]} words cover fewer than {n} tokens")
    return masks if masks.stride(1) == 1 else masks.contiguous()


def argmax(
    logits: torch.Tensor, masks: torch.Tensor | None = None, *, pdl: bool = False
) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for a ``[B, V]`` tensor: int64 ``[B]``; with ``masks``, over
    the allowed tokens only (``reference.argmax``)."""
    rows, n = logits.shape
    if masks is not None:
        masks = _check_masks(logits, masks)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = min(_CHUNK, triton.next_power_of_2(n))
    n_chunks = triton.cdiv(n, block)
    vals = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows, n_chunks), dtype=torch.int32, device=logits.device)
    m = masks if masks is not None else idx  # not read without HAS_MASK
    _argmax_chunk_kernel[(rows, n_chunks)](
        logits, m, vals, idx, n, logits.stride(0), m.stride(0), n_chunks,
        HAS_MASK=masks is not None, BLOCK=block, USE_PDL=pdl, num_warps=8, **launch_options(pdl),
    )  # fmt: skip
    _argmax_rows_kernel[(rows,)](
        vals, idx, out, n_chunks, BLOCK_C=triton.next_power_of_2(n_chunks), USE_PDL=pdl,
        num_warps=1, **launch_options(pdl),
    )  # fmt: skip
    return out


@triton.jit
def _apply_mask_kernel(
    x_ptr, m_ptr, out_ptr, n, stride_x, stride_m, stride_o, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < n)
    x = tl.where(_allowed(m_ptr, row, stride_m, offs, n), x, float("-inf"))
    tl.store(out_ptr + row.to(tl.int64) * stride_o + offs, x, mask=offs < n)


def apply_token_bitmask(
    logits: torch.Tensor, masks: torch.Tensor, *, pdl: bool = False
) -> torch.Tensor:
    """``reference.apply_token_bitmask`` in one kernel: a copy of ``logits`` ``[B, V]`` with
    the tokens ``masks`` forbids set to -inf."""
    rows, n = logits.shape
    masks = _check_masks(logits, masks)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if rows == 0:
        return out
    block = min(_CHUNK, triton.next_power_of_2(n))
    _apply_mask_kernel[(rows, triton.cdiv(n, block))](
        logits, masks, out, n, logits.stride(0), masks.stride(0), out.stride(0), BLOCK=block,
        USE_PDL=pdl, num_warps=8, **launch_options(pdl),
    )  # fmt: skip
    return out
