"""The Triton attention backend: paged decode (GQA, split-K) and paged extend (causal, prefix).

Decode reads each KV head once for all the query heads that share it: one program owns a
``(row, kv head, split)`` triple and multiplies a ``[group, D]`` query tile against ``[BLOCK_N,
D]`` K/V tiles gathered page by page. Long contexts are split over several programs (split-K):
stage 1 writes each split's normalised partial output and its log-sum-exp, stage 2 merges them.
The split count is a launch constant, fixed per decode bucket when graphs are captured, and
the split *length* is derived on the device from each row's length, so a graph captured once
serves any context. Partial results live in buffers sized in ``init_capture_graph``.

Extend (prefill, chunked prefill, mixed steps) runs a flash-attention loop per ``(query block,
sequence, kv head)``; the rows of a query block are ``(token, q head)`` pairs of one KV head so
K/V tiles are shared by the group here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from graphrt.kernels.attention_backend import AttentionBackend, AttentionSpec, AttnInputs
from graphrt.kernels.pdl import launch_options, pdl_enter
from graphrt.kernels.reference import check_kv_scale

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TritonAttentionConfig:
    """Launch parameters. ``num_splits`` forces the decode split count (tests, benchmarks);
    ``None`` picks it from the batch, the KV heads and the SM count.

    The defaults come from ``benchmarks/kernel_bench.py --sweep`` on an H100 (Llama-3.1-8B heads,
    page size 16). Decode: within 0.5% of the best of 18 block/warp/stage configurations at
    batch 64, 2k and 8k context. Extend: the fastest of 9 tilings for 4 x 512 new tokens over a
    1536-token prefix (299 TFLOP/s; 64x64, 4 warps, 2 stages gave 273).
    """

    decode_block_n: int = 64
    # For e4m3 caches: the same 16 KB K/V tile per head (128-dim heads) as decode_block_n's over
    # a 2-byte cache. s31a sweep, Llama-3.1-8B heads at batch 64 over an e4m3 cache: 128 is
    # within 2.5% of the best of 24 block/warp/stage configurations at 256 tokens a row (20.16
    # against 19.70 us for 32) and the best at 2,048 (137.8 us, stages 3; 64 gives 163.3).
    decode_block_n_fp8: int = 128
    decode_warps: int = 4
    decode_stages: int = 3
    ctas_per_sm: int = 4
    max_splits: int = 32
    num_splits: int | None = None
    extend_block_m: int = 128
    extend_block_n: int = 32
    extend_warps: int = 4
    extend_stages: int = 3
    # Eager steps that mix decode rows with prefill chunks run their leading one-token rows
    # through the decode kernel when there are at least mixed_decode_min_rows of them (0:
    # never) and at least mixed_split_min_prefill prefill tokens. The extend kernel gives each
    # one-token row a 128-row tile with GROUP useful rows and no split over the context: at
    # ~240 decode rows over ~800 tokens it took 331 us per layer on an H100 where the KV bytes
    # alone need ~130 us (offline_throughput --profile-kernels). The split costs two more
    # launches per layer, so it pays only where the step is GPU-bound: Llama-3.2-1B offline,
    # 8192-token budget (steps of ~4,500 prefill tokens), 40,243 against 39,219 output tok/s;
    # 2048-token budget (~900, launch-bound), 25,158 / 26,693 against 28,652 / 29,768.
    mixed_decode_min_rows: int = 8
    mixed_split_min_prefill: int = 2048

    def decode_block(self, fp8_kv: bool) -> int:
        """The decode kernel's tokens per block over a cache of this kind."""
        return self.decode_block_n_fp8 if fp8_kv else self.decode_block_n


# ---- decode -------------------------------------------------------------------------------------


@triton.jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Tokens per split, a whole number of blocks; shared by both stages so they agree on which
    # splits hold data.
    per = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    return tl.maximum(per, BLOCK_N)


@triton.jit
def _varlen_token(cu_q_ptr, b, VARLEN: tl.constexpr):
    # The flat token index of row b's one query token, or -1 when the row is not a one-token
    # row (mixed steps: the extend kernel owns it). Without VARLEN, row b is token b.
    if VARLEN:
        start = tl.load(cu_q_ptr + b)
        n = tl.load(cu_q_ptr + b + 1) - start
        return tl.where(n == 1, start, -1)
    else:
        return b


@triton.jit
def _page_ids(row_pages, n0, end, offs, PAGE_SIZE: tl.constexpr):
    # The page of each position of the block at n0 (0, the dummy page, past end).
    pos = n0 + offs
    return tl.load(row_pages + pos // PAGE_SIZE, mask=pos < end, other=0).to(tl.int64)


@triton.jit
def _kv_block(
    k_ptr, v_ptr, pages, n0, end, offs, d, dmask, stride_kt, head_off, PAGE_SIZE: tl.constexpr
):
    # One block's K and V tiles ([BLOCK_N, BLOCK_D], zeros past end), in the cache's dtype.
    pos = n0 + offs
    rows = pages * PAGE_SIZE + pos % PAGE_SIZE
    kv_off = rows[:, None] * stride_kt + head_off + d[None, :]
    kv_mask = (pos < end)[:, None] & dmask[None, :]
    k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _decode_block(q, k, v, pmask, m_i, l_i, acc, scale_log2, DOT_PRECISION: tl.constexpr):
    # One block of the online softmax; e4m3 tiles upcast to the query's dtype exactly.
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    s = tl.where(pmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    page_rows_ptr,
    seq_lens_ptr,
    cu_q_ptr,
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    kv_scale_ptr,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_pr,
    stride_ob,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    scale_log2,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    VARLEN: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    # Before the early return below: a PDL kernel must not complete before the one it follows.
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # VARLEN: rows of a mixed step; only rows feeding exactly one token are this kernel's, and
    # that token sits at cu_q[b] of the flat token dim.
    tok = _varlen_token(cu_q_ptr, b, VARLEN)
    if tok < 0:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    per = _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    start = split * per
    end = tl.minimum(start + per, seq_len)
    if NUM_SPLITS > 1:  # noqa: SIM102 - a constexpr test; the inner one is a runtime branch
        if start >= end:
            return  # the merge reads only splits that hold tokens

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + tok.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    v_scale = 1.0
    if FP8_KV:
        # e4m3 K/V times a per-tensor scale: K's goes into the softmax scale, V's onto the sum.
        scale_log2 = scale_log2 * tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    row_pages = page_rows_ptr + b.to(tl.int64) * stride_pr
    head_off = kvh * stride_kh
    # Triton pipelines this loop's K/V loads (asynchronous copies, NUM_STAGES deep); a loop that
    # issued them one block ahead by hand instead was slower at every configuration tried
    # (s31a: 25.8 against 19.7 us, e4m3, 64 rows x 256 tokens).
    for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        pages = _page_ids(row_pages, n0, end, offs, PAGE_SIZE)
        k, v = _kv_block(k_ptr, v_ptr, pages, n0, end, offs, d, dmask, stride_kt, head_off,
                         PAGE_SIZE)  # fmt: skip
        m_i, l_i, acc = _decode_block(q, k, v, n0 + offs < end, m_i, l_i, acc, scale_log2,
                                      DOT_PRECISION)  # fmt: skip

    # An empty row (length 0) yields zeros rather than 0/0.
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    if FP8_KV:
        o = o * v_scale
    omask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + tok.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        mid = mid_o_ptr + b.to(tl.int64) * stride_mb + split * stride_ms
        tl.store(mid + heads[:, None] * stride_mh + d[None, :], o, mask=omask)
        lse = m_i + tl.log2(safe_l)
        lse_dst = mid_lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split
        tl.store(lse_dst, lse, mask=gmask)


@triton.jit
def _decode_merge_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    seq_lens_ptr,
    cu_q_ptr,
    out_ptr,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    tok = _varlen_token(cu_q_ptr, b, VARLEN)
    if tok < 0:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    per = _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    n_valid = tl.cdiv(seq_len, per)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < n_valid
    lse = tl.load(
        mid_lse_ptr + b.to(tl.int64) * stride_lb + h * stride_lh + s,
        mask=smask,
        other=-float("inf"),
    )
    m = tl.max(lse, axis=0)
    m = tl.where(m == -float("inf"), 0.0, m)
    w = tl.where(smask, tl.exp2(lse - m), 0.0)
    denom = tl.sum(w, axis=0)
    o = tl.load(
        mid_o_ptr
        + b.to(tl.int64) * stride_mb
        + h * stride_mh
        + s[:, None] * stride_ms
        + d[None, :],
        mask=smask[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    res = tl.sum(o * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + tok.to(tl.int64) * stride_ob + h * stride_oh + d,
        res.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 models (CPU parity runs) need exact fp32 products; tf32 would cost ~1e-3.
    return "ieee" if dtype == torch.float32 else None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: TritonAttentionConfig | None = None,
    pdl: bool = False,
    cu_q: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per row. ``q``: ``[B, Hq, D]``; caches ``[pages, page_size, Hkv, D]``;
    ``page_rows``: ``[B, W]`` int32; ``seq_lens``: ``[B]`` (KV length including this token).
    e4m3 caches hold ``K / kv_scale[0]`` and ``V / kv_scale[1]`` (``kv_scale``: fp32 ``[2]``).

    With ``num_splits > 1``, ``mid_o`` (``[B, Hq, S, D]`` fp32) and ``mid_lse`` (``[B, Hq, S]``
    fp32) hold the partial results; they are allocated here when not given.

    With ``cu_q`` (``[B + 1]`` token offsets of a mixed step), ``q`` and ``out`` are ``[T, Hq,
    D]`` over the step's tokens and only rows that feed exactly one token are computed, each
    into its token's row of ``out``; the others are left for the extend kernel.
    """
    cfg = config or TritonAttentionConfig()
    bsz = seq_lens.shape[0]
    _, hq, dim = q.shape
    _, page_size, hkv, _ = k_cache.shape
    group = hq // hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    varlen = cu_q is not None
    if not varlen and q.shape[0] != bsz:
        raise ValueError(f"decode attention: {q.shape[0]} query rows for {bsz} sequences")
    if num_splits > 1:
        if mid_o is None:
            mid_o = torch.empty((bsz, hq, num_splits, dim), dtype=torch.float32, device=q.device)
        if mid_lse is None:
            mid_lse = torch.empty((bsz, hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # unused by the kernel; any tensor will do
    fp8_kv = check_kv_scale(k_cache, kv_scale)
    block_n = cfg.decode_block(fp8_kv)
    kf = k_cache.view(-1, hkv, dim)
    vf = v_cache.view(-1, hkv, dim)
    block_d = triton.next_power_of_2(dim)
    _decode_kernel[(bsz, hkv, num_splits)](
        q, kf, vf, page_rows, seq_lens, cu_q if varlen else seq_lens, out, mid_o, mid_lse,
        kv_scale if fp8_kv else seq_lens,
        q.stride(0), q.stride(1), kf.stride(0), kf.stride(1), page_rows.stride(0),
        out.stride(0), out.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2) if num_splits > 1 else 0,
        mid_lse.stride(0), mid_lse.stride(1),
        scale * _LOG2E,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
        BLOCK_D=block_d, PAGE_SIZE=page_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, NUM_STAGES=cfg.decode_stages,
        DOT_PRECISION=_dot_precision(q.dtype), USE_PDL=pdl, VARLEN=varlen, FP8_KV=fp8_kv,
        num_warps=cfg.decode_warps,
        **launch_options(pdl),
    )  # fmt: skip
    if num_splits > 1:
        _decode_merge_kernel[(bsz, hq)](
            mid_o, mid_lse, seq_lens, cu_q if varlen else seq_lens, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
            HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_N=block_n, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), USE_PDL=pdl, VARLEN=varlen,
            num_warps=4,
            **launch_options(pdl),
        )  # fmt: skip
    return out


def choose_num_splits(
    bsz: int,
    num_kv_heads: int,
    kv_len_bound: int,
    sm_count: int,
    cfg: TritonAttentionConfig,
    fp8_kv: bool = False,
) -> int:
    """Splits per row: as many as keep ``bsz * num_kv_heads * splits`` programs within
    ``ctas_per_sm`` per SM (at least one), and no more than the decode blocks (of the cache's
    kind, :meth:`TritonAttentionConfig.decode_block`) that fit in ``kv_len_bound``. Depends on
    host integers only, so it is fixed for a captured bucket.

    On an H100 at batch 64 with 8 KV heads this gives one split (512 programs already fill the
    132 SMs; a second split measured no faster), at batch 8 eight.
    """
    if cfg.num_splits is not None:
        return cfg.num_splits
    programs = max(1, bsz * num_kv_heads)
    want = (cfg.ctas_per_sm * sm_count) // programs
    blocks = max(1, triton.cdiv(kv_len_bound, cfg.decode_block(fp8_kv)))
    return max(1, min(want, blocks, cfg.max_splits))


# ---- extend -------------------------------------------------------------------------------------


@triton.jit
def _extend_block(
    q,
    k_ptr,
    v_ptr,
    row_pages,
    head_off,
    stride_kt,
    n0,
    kv_end,
    qpos,
    m_i,
    l_i,
    acc,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One K/V block of the online softmax; ``MASKED`` adds the causal and length masks."""
    pos = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    pmask = pos < kv_end
    page = tl.load(row_pages + pos // PAGE_SIZE, mask=pmask, other=0).to(tl.int64)
    kv_off = (page * PAGE_SIZE + pos % PAGE_SIZE)[:, None] * stride_kt + head_off + d[None, :]
    kv_mask = pmask[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
    v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        s = tl.where((pos[None, :] <= qpos[:, None]) & pmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 so exp2 stays finite.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _find_row(cu_q_ptr, j, num_rows, BLOCK_Q: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    # Static grids: query block j belongs to the last row b whose first block, cu_q[b] //
    # BLOCK_Q + b, is at most j. Row b owns cu_q[b + 1] // BLOCK_Q - cu_q[b] // BLOCK_Q + 1
    # blocks, at least the cdiv(q_len, BLOCK_Q) it needs, so T // BLOCK_Q + B programs cover
    # any split of T tokens into B rows; the spare ones exit.
    lo = j * 0
    hi = num_rows - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        first = tl.load(cu_q_ptr + mid) // BLOCK_Q + mid
        go_up = first <= j
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, mid - 1)
    return lo, j - (tl.load(cu_q_ptr + lo) // BLOCK_Q + lo)


@triton.jit
def _extend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    page_rows_ptr,
    seq_lens_ptr,
    cu_q_ptr,
    num_rows,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_pr,
    stride_ot,
    stride_oh,
    scale_log2,
    kv_scale_ptr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STATIC_GRID: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    # A program owns BLOCK_Q query tokens of one row and one KV head: BLOCK_Q * GROUP tile rows
    # of (token, q head) pairs sharing every K/V tile.
    if STATIC_GRID:
        b, mblk = _find_row(cu_q_ptr, tl.program_id(0), num_rows, BLOCK_Q, SEARCH_STEPS)
        kvh = tl.program_id(1)
    else:
        mblk = tl.program_id(0)
        b = tl.program_id(1)
        kvh = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if mblk * BLOCK_Q >= q_len:
        return
    if SKIP_SINGLE:  # noqa: SIM102 - a constexpr test; the inner one is a runtime branch
        if q_len == 1:
            return  # a one-token row: the decode kernel's (mixed steps)
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # tokens cached before this step's

    # Row r of the tile is (token mblk * BLOCK_Q + r // GROUP, q head kvh * GROUP + r % GROUP).
    r = tl.arange(0, BLOCK_M)
    first_tok = mblk * BLOCK_Q
    tok = first_tok + r // GROUP
    head = kvh * GROUP + r % GROUP
    rmask = (r < BLOCK_Q * GROUP) & (tok < q_len)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    )
    qpos = ctx + tok  # absolute position of each row's token
    v_scale = 1.0
    if FP8_KV:
        # As in the decode kernel: K's scale into the softmax scale, V's onto the sum.
        scale_log2 = scale_log2 * tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last_tok = tl.minimum(first_tok + BLOCK_Q, q_len) - 1
    kv_end = tl.minimum(ctx + last_tok + 1, seq_len)
    # Blocks wholly at or before the tile's first token are visible to every row: no masks.
    n_full = ((ctx + first_tok + 1) // BLOCK_N) * BLOCK_N
    row_pages = page_rows_ptr + b.to(tl.int64) * stride_pr
    head_off = kvh * stride_kh
    for n0 in tl.range(0, n_full, BLOCK_N, num_stages=NUM_STAGES):
        m_i, l_i, acc = _extend_block(
            q, k_ptr, v_ptr, row_pages, head_off, stride_kt, n0, kv_end, qpos, m_i, l_i, acc,
            scale_log2, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, False, DOT_PRECISION,
        )  # fmt: skip
    for n0 in tl.range(n_full, kv_end, BLOCK_N, num_stages=NUM_STAGES):
        m_i, l_i, acc = _extend_block(
            q, k_ptr, v_ptr, row_pages, head_off, stride_kt, n0, kv_end, qpos, m_i, l_i, acc,
            scale_log2, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, True, DOT_PRECISION,
        )  # fmt: skip

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if FP8_KV:
        o = o * v_scale
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & dmask[None, :],
    )


def extend_tile(group: int, cfg: TritonAttentionConfig) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_Q)``: tile rows, and the query tokens a tile holds (``BLOCK_Q * group
    <= BLOCK_M``; a group that does not divide ``BLOCK_M`` leaves a few rows idle)."""
    block_m = max(cfg.extend_block_m, triton.next_power_of_2(group))
    return block_m, block_m // group


def static_extend_programs(
    num_tokens: int, num_rows: int, group: int, cfg: TritonAttentionConfig
) -> int:
    """Query-block programs of a static-grid extend launch over ``num_tokens`` tokens in
    ``num_rows`` rows (per KV head): enough for any split of the tokens into the rows."""
    return num_tokens // extend_tile(group, cfg)[1] + num_rows


def paged_extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_q: torch.Tensor,
    max_q_len: int | None,
    scale: float,
    config: TritonAttentionConfig | None = None,
    out: torch.Tensor | None = None,
    skip_single: bool = False,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    ``q``: ``[T, Hq, D]`` with sequence ``b``'s tokens at ``[cu_q[b], cu_q[b+1])``, at positions
    ``[seq_lens[b] - n, seq_lens[b])``. ``max_q_len`` (a host int) sizes the grid; ``None``
    launches a static grid sized from the shapes alone, which finds each program's row on the
    device (``_find_row``): capturable, for any ``cu_q`` whose last entry is at most ``T``.
    ``skip_single`` leaves rows of one token alone (mixed steps send them to the decode
    kernel). ``out`` (``[T, Hq, D]``, unit stride in the last dim) receives the result when
    given. e4m3 caches need ``kv_scale``, as in :func:`paged_decode_attention`.
    """
    cfg = config or TritonAttentionConfig()
    t, hq, dim = q.shape
    _, page_size, hkv, _ = k_cache.shape
    group = hq // hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((t, hq, dim), dtype=q.dtype, device=q.device)
    bsz = seq_lens.shape[0]
    if t == 0 or bsz == 0:
        return out
    fp8_kv = check_kv_scale(k_cache, kv_scale)
    kf = k_cache.view(-1, hkv, dim)
    vf = v_cache.view(-1, hkv, dim)
    block_m, block_q = extend_tile(group, cfg)
    static = max_q_len is None
    if static:
        grid = (static_extend_programs(t, bsz, group, cfg), hkv)
    else:
        grid = (triton.cdiv(max_q_len, block_q), bsz, hkv)
    _extend_kernel[grid](
        q, kf, vf, out, page_rows, seq_lens, cu_q, bsz,
        q.stride(0), q.stride(1), kf.stride(0), kf.stride(1), page_rows.stride(0),
        out.stride(0), out.stride(1), scale * _LOG2E, kv_scale if fp8_kv else seq_lens,
        GROUP=group, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=cfg.extend_block_n,
        NUM_STAGES=cfg.extend_stages, DOT_PRECISION=_dot_precision(q.dtype),
        STATIC_GRID=static, SEARCH_STEPS=max(1, (bsz - 1).bit_length()),
        SKIP_SINGLE=skip_single, FP8_KV=fp8_kv, num_warps=cfg.extend_warps,
    )  # fmt: skip
    return out


# ---- the backend --------------------------------------------------------------------------------


@dataclass
class TritonDecodeMeta:
    """Decode metadata: the step's inputs, its split count and the partial-result buffers."""

    inputs: AttnInputs
    num_splits: int
    mid_o: torch.Tensor | None
    mid_lse: torch.Tensor | None


@dataclass
class TritonVarlenMeta:
    """A static-shape mixed step (``prepare_for_mixed``): the decode kernel over every row, which
    computes only the one-token rows, then the static-grid extend kernel, which computes the
    others; both write into one output."""

    inputs: AttnInputs
    num_splits: int
    mid_o: torch.Tensor | None
    mid_lse: torch.Tensor | None


@dataclass
class TritonMixedMeta:
    """An eager step whose first ``n_decode`` rows feed one token each (the scheduler puts
    decode rows first): those rows through the decode kernel, the rest (``extend``, or None)
    through the extend kernel, both writing into one output."""

    n_decode: int
    decode: TritonDecodeMeta
    extend: AttnInputs | None


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so CPU tests still take the split-K path on long rows


class TritonAttentionBackend(AttentionBackend):
    """Triton paged attention. Decode needs no host metadata, so ``prepare_for_replay`` is a
    no-op: everything a graph reads (lengths, page rows) is already on the device."""

    name = "triton"
    mixed_graphs = True
    fp8_kv = True

    def __init__(
        self,
        spec: AttentionSpec,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        kv_scales: torch.Tensor | None = None,
        config: TritonAttentionConfig | None = None,
    ) -> None:
        super().__init__(spec, k_caches, v_caches, kv_scales)
        if spec.num_q_heads % spec.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({spec.num_q_heads}) must be a multiple of num_kv_heads "
                f"({spec.num_kv_heads})"
            )
        self.config = config or TritonAttentionConfig()
        self.sm_count = _sm_count(spec.device)
        self._mid_o: torch.Tensor | None = None
        self._mid_lse: torch.Tensor | None = None

    def num_splits(self, bsz: int, kv_len_bound: int) -> int:
        return choose_num_splits(
            bsz,
            self.spec.num_kv_heads,
            kv_len_bound,
            self.sm_count,
            self.config,
            fp8_kv=self.kv_scales is not None,
        )

    def prepare_metadata(
        self, inputs: AttnInputs
    ) -> AttnInputs | TritonDecodeMeta | TritonMixedMeta:
        if not inputs.is_decode:
            if inputs.cu_q is None:
                raise ValueError("triton extend steps need cu_q")
            return self._split_mixed(inputs) or inputs
        s = self.spec
        bsz = inputs.seq_lens.shape[0]
        splits = self.num_splits(bsz, inputs.kv_len_bound)
        if splits == 1:
            return TritonDecodeMeta(inputs, 1, None, None)
        # Eager steps allocate their partials once per step (shared by the layers); graphs
        # use the static ones from init_capture_graph.
        dev = inputs.seq_lens.device
        mid_o = torch.empty(bsz, s.num_q_heads, splits, s.head_dim, dtype=torch.float32, device=dev)
        mid_lse = torch.empty(bsz, s.num_q_heads, splits, dtype=torch.float32, device=dev)
        return TritonDecodeMeta(inputs, splits, mid_o, mid_lse)

    def _split_mixed(self, inputs: AttnInputs) -> TritonMixedMeta | None:
        """Metadata that sends the step's leading one-token rows to the decode kernel, or None
        when there are fewer than ``mixed_decode_min_rows`` of them, fewer than
        ``mixed_split_min_prefill`` other tokens, or no host copies."""
        cu, lens = inputs.cu_q_host, inputs.seq_lens_host
        least = self.config.mixed_decode_min_rows
        if cu is None or lens is None or least <= 0:
            return None
        q_lens = np.diff(cu)
        longer = np.flatnonzero(q_lens != 1)
        n = int(longer[0]) if longer.size else int(q_lens.size)
        if n < least or int(cu[-1]) - n < self.config.mixed_split_min_prefill:
            return None
        ps = self.spec.page_size
        decode = self.prepare_metadata(
            AttnInputs(
                is_decode=True,
                seq_lens=inputs.seq_lens[:n],
                page_rows=inputs.page_rows[:n],
                kv_len_bound=-(-int(lens[:n].max()) // ps) * ps,
            )
        )
        extend = None
        if n < q_lens.size:
            rest = cu[n:] - n  # the decode rows hold the first n tokens, one each
            extend = AttnInputs(
                is_decode=False,
                seq_lens=inputs.seq_lens[n:],
                page_rows=inputs.page_rows[n:],
                kv_len_bound=inputs.kv_len_bound,
                cu_q=inputs.cu_q[n:] - n,
                max_q_len=int(q_lens[n:].max()),
                seq_lens_host=lens[n:],
                cu_q_host=rest,
            )
        return TritonMixedMeta(n, decode, extend)

    def prepare_for_mixed(self, inputs: AttnInputs, capture: bool) -> TritonVarlenMeta:
        if inputs.cu_q is None:
            raise ValueError("mixed steps need cu_q")
        rows = inputs.seq_lens.shape[0]
        if capture:
            d = self.prepare_for_capture(rows, inputs)
        else:
            d = self.prepare_metadata(
                AttnInputs(True, inputs.seq_lens, inputs.page_rows, inputs.kv_len_bound)
            )
        return TritonVarlenMeta(inputs, d.num_splits, d.mid_o, d.mid_lse)

    def init_capture_graph(self, max_bs: int) -> None:
        s = self.spec
        bound = s.max_pages_per_seq * s.page_size
        rows = max(bs * self.num_splits(bs, bound) for bs in range(1, max_bs + 1))
        dev = s.device
        self._mid_o = torch.empty(
            rows * s.num_q_heads * s.head_dim, dtype=torch.float32, device=dev
        )
        self._mid_lse = torch.empty(rows * s.num_q_heads, dtype=torch.float32, device=dev)

    def prepare_for_capture(self, bs: int, inputs: AttnInputs) -> TritonDecodeMeta:
        if self._mid_o is None or self._mid_lse is None:
            raise RuntimeError("init_capture_graph must run before prepare_for_capture")
        s = self.spec
        splits = self.num_splits(bs, inputs.kv_len_bound)
        n = bs * s.num_q_heads * splits
        if n > self._mid_lse.numel():
            raise RuntimeError(f"decode bucket {bs} exceeds the max_bs given to init_capture_graph")
        mid_o = self._mid_o[: n * s.head_dim].view(bs, s.num_q_heads, splits, s.head_dim)
        mid_lse = self._mid_lse[:n].view(bs, s.num_q_heads, splits)
        return TritonDecodeMeta(inputs, splits, mid_o, mid_lse)

    def forward(
        self, q: torch.Tensor, layer: int, meta: AttnInputs | TritonDecodeMeta | TritonMixedMeta
    ) -> torch.Tensor:
        if isinstance(meta, TritonDecodeMeta):
            return self._decode(q, layer, meta)
        if isinstance(meta, TritonVarlenMeta):
            return self._varlen(q, layer, meta)
        if isinstance(meta, TritonMixedMeta):
            n = meta.n_decode
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            self._decode(q[:n], layer, meta.decode, out[:n])
            if meta.extend is not None:
                self._extend(q[n:], layer, meta.extend, out[n:])
            return out
        return self._extend(q, layer, meta)

    def _varlen(self, q: torch.Tensor, layer: int, meta: TritonVarlenMeta) -> torch.Tensor:
        inp = meta.inputs
        k, v = self.k_caches[layer], self.v_caches[layer]
        # Tokens past cu_q[-1] (bucket padding) belong to no row: neither kernel writes them,
        # and nothing reads them but their own token's rows of the layers after.
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        kv_scale = self.kv_scale(layer)
        paged_decode_attention(
            q, k, v, inp.page_rows, inp.seq_lens, self.spec.scale, meta.num_splits,
            meta.mid_o, meta.mid_lse, out=out, config=self.config, pdl=self.spec.pdl,
            cu_q=inp.cu_q, kv_scale=kv_scale,
        )  # fmt: skip
        paged_extend_attention(
            q, k, v, inp.page_rows, inp.seq_lens, inp.cu_q, None, self.spec.scale,
            config=self.config, out=out, skip_single=True, kv_scale=kv_scale,
        )  # fmt: skip
        return out

    def _decode(
        self, q: torch.Tensor, layer: int, meta: TritonDecodeMeta, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        inp = meta.inputs
        return paged_decode_attention(
            q,
            self.k_caches[layer],
            self.v_caches[layer],
            inp.page_rows,
            inp.seq_lens,
            self.spec.scale,
            meta.num_splits,
            meta.mid_o,
            meta.mid_lse,
            out=out,
            config=self.config,
            pdl=self.spec.pdl,
            kv_scale=self.kv_scale(layer),
        )

    def _extend(
        self, q: torch.Tensor, layer: int, meta: AttnInputs, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return paged_extend_attention(
            q,
            self.k_caches[layer],
            self.v_caches[layer],
            meta.page_rows,
            meta.seq_lens,
            meta.cu_q,
            meta.max_q_len,
            self.spec.scale,
            config=self.config,
            out=out,
            kv_scale=self.kv_scale(layer),
        )
