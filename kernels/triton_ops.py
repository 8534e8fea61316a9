"""Fused Triton kernels for the elementwise ops of a decoder layer.

Each function has exactly the signature of its torch reference in
:mod:`graphrt.kernels.reference` and follows the same numerics (fp32 norm math, rotary rounded
in the activation dtype at the same points as HF). Every wrapper is CUDA-graph safe: outputs
are allocated from shapes alone, nothing reads a device value on the host, and there is one
kernel launch per call. They also run on CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graphrt.kernels.pdl import launch_options, pdl_enter
from graphrt.kernels.reference import check_kv_scale
from graphrt.kernels.triton_e4m3 import hw_cast, to_e4m3


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _norm_warps(block: int) -> int:
    # One row per program: enough warps that each thread holds <= ~16 values of the row.
    return max(1, min(16, block // 256))


# ---- RMSNorm ------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    n_inner,
    stride_x0,
    stride_x1,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Rows are addressed as (outer, inner) so [T, H, D] views of a fused qkv (not flattenable
    # without a copy) are read in place.
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    outer = row // n_inner
    inner = row % n_inner
    x_off = outer.to(tl.int64) * stride_x0 + inner.to(tl.int64) * stride_x1
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + x_off + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    xn = (x * inv).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = xn.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False
) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dim; ``x`` may be a strided ``[T, H, D]`` view."""
    n = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:
        n_inner, s0, s1 = x.shape[1], x.stride(0), x.stride(1)
    else:
        if x.dim() != 2:
            x = x.reshape(-1, n)
        n_inner, s0, s1 = 1, x.stride(0), 0
    out = torch.empty(x.shape, dtype=torch.result_type(x, weight), device=x.device)
    rows = out.numel() // n
    if rows == 0:
        return out
    block = _pow2(n)
    _rms_norm_kernel[(rows,)](
        x, weight, out, n_inner, s0, s1, n, eps, BLOCK=block, USE_PDL=pdl,
        num_warps=_norm_warps(block), **launch_options(pdl),
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class NormConfig:
    """Launch parameters of the fused add + RMSNorm kernel. ``rows_per_program`` and ``evict``
    change no arithmetic (every row runs the same fp32 ops, the sum rounded to the activation
    dtype before the norm); ``num_warps`` sets the order of the fp32 sum of squares, which may
    move the normed output by an ulp, never the residual sum. ``test_kernels.py`` checks both
    (bit for bit on CPU; ``test_gpu_fused_add_rms_norm_configs_exact`` on a GPU)."""

    rows_per_program: int  # ROWS: rows per program, grid = cdiv(rows, ROWS)
    num_warps: int
    evict: bool = False  # EVICT: streaming hints (loads evict_first, stores .cs)


@functools.lru_cache(maxsize=1024)  # called per launch; eager steps launch 32 norms each
def norm_config(rows: int, n_cols: int) -> NormConfig:
    """The launch config of :func:`fused_add_rms_norm` for ``rows`` rows of ``n_cols``.

    The default is the kernel as it was first measured: one row per program, no cache hints,
    :func:`_norm_warps` warps. On an H100 with PDL, batch 256 x hidden 4096 bf16 with inputs
    rotated out of L2 reaches 69.8% of measured HBM (~4.0 us for 8 MB; 2.35 us L2-hot; issue
    #3, the target is 80%). All 256 programs are resident at once, so one guess was that the
    read and write phases run one after the other; the prefetching configs below, built to
    overlap them, did not help. With this config the kernel compiles to the same SASS as the
    one-row kernel before the configs existed (sm_90, Triton 3.6 and 3.9).

    The alternatives were measured on an H100 with PDL (run P2 in ``benchmarks/RUN_LOG.md``,
    ``benchmarks/kernel_bench.py --only ops --sweep --no-decode-sweep``): of 26 configs (rows per
    program 1-8, where the program loads row i+1 before it stores row i; 2-16 warps;
    ``evict``, streaming the inputs and outputs past L2) none beat this default (3.97 us,
    70.8%; the best other, 4.04 us). They stay selectable for the sweep on other cards. Note
    that the sweep cannot see one cost of ``evict``: outputs stored with ``.cs`` are less
    likely to be in L2 for the next kernel, so check a change to it end to end.
    """
    return NormConfig(rows_per_program=1, num_warps=_norm_warps(_pow2(n_cols)), evict=False)


@triton.jit
def _load_row(ptr, mask, EVICT: tl.constexpr):
    if EVICT:
        v = tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        v = tl.load(ptr, mask=mask, other=0.0)
    return v


@triton.jit
def _store_row(ptr, value, mask, EVICT: tl.constexpr):
    # Keyword arguments: Triton 3.6's tl.store takes boundary_check positionally before them.
    if EVICT:
        tl.store(ptr, value, mask=mask, cache_modifier=".cs")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_rows,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    TAIL: tl.constexpr,
    EVICT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # ROWS rows per program. Row i+1's inputs are loaded before row i's results are stored, so
    # the stores of one row overlap the loads of the next. TAIL (rows % ROWS != 0) masks the
    # rows past the end (a row's mask is cols < n_cols, or cols < 0 past the end: one compare,
    # and the interpreter rejects a block mask and'ed with a scalar). No early return: every
    # program passes pdl_enter. The weight is loaded per row where the one-row kernel loaded it
    # (after the first store), so ROWS=1 is that kernel unchanged.
    pdl_enter(USE_PDL)
    row0 = tl.program_id(0) * ROWS
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    off = row0.to(tl.int64) * n_cols
    mask = cmask
    if TAIL:
        mask = cols < tl.where(row0 < n_rows, n_cols, 0)
    x = _load_row(x_ptr + off + cols, mask, EVICT)
    r = _load_row(r_ptr + off + cols, mask, EVICT)
    for i in tl.static_range(ROWS):
        if i + 1 < ROWS:
            next_off = off + n_cols
            next_mask = cmask
            if TAIL:
                next_mask = cols < tl.where(row0 + i + 1 < n_rows, n_cols, 0)
            next_x = _load_row(x_ptr + next_off + cols, next_mask, EVICT)
            next_r = _load_row(r_ptr + next_off + cols, next_mask, EVICT)
        # The sum is rounded to the activation dtype before the norm, as the reference does.
        s = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        _store_row(res_out_ptr + off + cols, s, mask, EVICT)
        sf = s.to(tl.float32)
        inv = tl.rsqrt(tl.sum(sf * sf, axis=0) / n_cols + eps)
        xn = (sf * inv).to(res_out_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
        y = xn.to(tl.float32) * w.to(tl.float32)
        _store_row(out_ptr + off + cols, y.to(out_ptr.dtype.element_ty), mask, EVICT)
        if i + 1 < ROWS:
            x, r, off, mask = next_x, next_r, next_off, next_mask


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    pdl: bool = False,
    cfg: NormConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)`` in one pass over memory.

    In place: when ``x`` and ``residual`` are contiguous, distinct and of the output dtype, the
    normed result overwrites ``x`` and the sum overwrites ``residual`` (both are returned). A
    decoder layer's residual stream and the GEMM output feeding it are dead after this call, so
    reusing them saves two activations per norm. Callers that still need either input must
    pass a copy. ``cfg`` overrides :func:`norm_config` (the benchmark sweeps it).
    """
    out_dtype = torch.result_type(x, weight)
    res_dtype = torch.result_type(x, residual)
    inplace = (
        x.is_contiguous()
        and residual.is_contiguous()
        and x.shape == residual.shape
        and x.dtype == residual.dtype == out_dtype == res_dtype
        and x.data_ptr() != residual.data_ptr()
    )
    if inplace:
        out, res_out = x, residual
    else:
        x, residual = x.contiguous(), residual.expand_as(x).contiguous()
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        res_out = torch.empty(x.shape, dtype=res_dtype, device=x.device)
    launch_fused_add_rms_norm(x, residual, weight, out, res_out, eps, cfg, pdl)
    return out, res_out


def launch_fused_add_rms_norm(
    x, residual, weight, out, res_out, eps, cfg, pdl, *, warmup: bool = False
) -> None:
    """The fused add + RMSNorm kernel with explicit outputs and launch config (what
    ``fused_add_rms_norm`` runs; benchmarks sweep configs and tests poison outputs through it)."""
    # The four activations are contiguous and of one shape (the tests pass poisoned outputs).
    # ``warmup`` compiles without launching (the benchmark compiles its sweep in parallel).
    n = x.shape[-1]
    rows = x.numel() // n
    if rows == 0:
        return
    if cfg is None:
        cfg = norm_config(rows, n)
    per = cfg.rows_per_program
    grid = (triton.cdiv(rows, per),)
    args = (x, residual, weight, out, res_out, rows, n, eps)
    kwargs = dict(
        BLOCK=_pow2(n), ROWS=per, TAIL=rows % per != 0, EVICT=cfg.evict, USE_PDL=pdl,
        num_warps=cfg.num_warps, **launch_options(pdl),
    )  # fmt: skip
    if warmup:
        _fused_add_rms_norm_kernel.warmup(*args, grid=grid, **kwargs)
    else:
        _fused_add_rms_norm_kernel[grid](*args, **kwargs)


# ---- SiLU-and-mul -------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # silu is rounded to the activation dtype before the product, as torch computes it.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * d + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for the fused gate/up projection output."""
    d = x.shape[-1] // 2
    if x.stride(-1) != 1 or (x.dim() > 2 and not x.is_contiguous()):
        x = x.contiguous()
    x2 = x.reshape(-1, 2 * d)
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0 or d == 0:
        return out
    block = min(1024, _pow2(d))
    grid = (rows, triton.cdiv(d, block))
    _silu_and_mul_kernel[grid](
        x2, out, d, x2.stride(0), BLOCK=block, USE_PDL=pdl, num_warps=4, **launch_options(pdl)
    )
    return out


# ---- rotary + KV write --------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    cache_ptr,
    stride_st,
    stride_sh,
    stride_ct,
    stride_ch,
    t,
    loc,
    cos,
    sin,
    n_heads,
    cache_scale,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    FP8_CACHE: tl.constexpr,
    HW_CAST: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < n_heads) & (d[None, :] < HALF)
    src = src_ptr + t.to(tl.int64) * stride_st + h[:, None] * stride_sh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    # HF rounds each product and the sum to the activation dtype; do the same.
    a1 = (x1.to(tl.float32) * cos[None, :]).to(dt).to(tl.float32)
    b1 = (x2.to(tl.float32) * sin[None, :]).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * cos[None, :]).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * sin[None, :]).to(dt).to(tl.float32)
    o1 = (a1 - b1).to(dt)
    o2 = (a2 + b2).to(dt)
    n_dim = 2 * HALF
    dst = dst_ptr + t.to(tl.int64) * n_heads * n_dim + h[:, None] * n_dim + d[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)
    if WRITE_CACHE:
        cdst = cache_ptr + loc * stride_ct + h[:, None] * stride_ch + d[None, :]
        c1 = _cache_value(o1, cache_scale, cache_ptr, FP8_CACHE, HW_CAST)
        c2 = _cache_value(o2, cache_scale, cache_ptr, FP8_CACHE, HW_CAST)
        tl.store(cdst, c1, mask=mask)
        tl.store(cdst + HALF, c2, mask=mask)


@triton.jit
def _cache_value(x, scale, cache_ptr, FP8_CACHE: tl.constexpr, HW_CAST: tl.constexpr):
    # What the cache stores for activation-dtype values x: x itself, or in an FP8 cache
    # x / scale rounded to e4m3 (the reference's store_kv, bit for bit).
    if FP8_CACHE:
        return to_e4m3(x.to(tl.float32), scale, HW_CAST).to(cache_ptr.dtype.element_ty)
    else:
        return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _rope_and_store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    locs_ptr,
    q_out_ptr,
    k_out_ptr,
    kv_scale_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_ct,
    stride_ch,
    n_q_heads,
    n_kv_heads,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    FP8_CACHE: tl.constexpr,
    HW_CAST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    # An FP8 cache's per-layer (k, v) scales; a bf16 cache reads none.
    k_scale = 1.0
    v_scale = 1.0
    if FP8_CACHE:
        k_scale = tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)
    loc = tl.load(locs_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    # HF casts the fp32 table to the activation dtype before multiplying.
    dt = q_ptr.dtype.element_ty
    cos = tl.load(cos_sin_ptr + pos * stride_cs + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d, mask=dmask, other=0.0)
    sin = sin.to(dt).to(tl.float32)
    _rotate_heads(
        q_ptr, q_out_ptr, q_out_ptr, stride_qt, stride_qh, 0, 0, t, loc, cos, sin, n_q_heads,
        1.0, HALF, BLOCK_HQ, BLOCK_HALF, False, False, HW_CAST,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, k_out_ptr, k_cache_ptr, stride_kt, stride_kh, stride_ct, stride_ch, t, loc, cos,
        sin, n_kv_heads, k_scale, HALF, BLOCK_HKV, BLOCK_HALF, True, FP8_CACHE, HW_CAST,
    )  # fmt: skip
    h = tl.arange(0, BLOCK_HKV)
    dd = tl.arange(0, 2 * BLOCK_HALF)
    mask = (h[:, None] < n_kv_heads) & (dd[None, :] < 2 * HALF)
    v = tl.load(
        v_ptr + t.to(tl.int64) * stride_vt + h[:, None] * stride_vh + dd[None, :], mask=mask
    )
    vdst = v_cache_ptr + loc * stride_ct + h[:, None] * stride_ch + dd[None, :]
    tl.store(vdst, _cache_value(v, v_scale, v_cache_ptr, FP8_CACHE, HW_CAST), mask=mask)


def rope_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache_flat: torch.Tensor,
    v_cache_flat: torch.Tensor,
    locs: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary on ``q`` and ``k`` and the write of rotated ``k`` and ``v`` into cache rows
    ``locs``, in one kernel. ``q``/``k``/``v`` may be strided views of a fused qkv output.
    An FP8 (e4m3) cache stores ``k / kv_scale[0]`` and ``v / kv_scale[1]`` (``kv_scale``: the
    layer's fp32 ``[2]`` scales, read on the device) as :func:`reference.store_kv` does.

    Returns the rotated ``(q, k)`` as new contiguous tensors.
    """
    t, hq, dim = q.shape
    hkv = k.shape[1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k_cache_flat.stride(-1) != 1 or k_cache_flat.stride() != v_cache_flat.stride():
        raise ValueError("k and v caches must share a layout with a contiguous last dim")
    q_out = torch.empty((t, hq, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hkv, dim), dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    fp8_cache = check_kv_scale(k_cache_flat, kv_scale)
    half = dim // 2
    _rope_and_store_kv_kernel[(t,)](
        q, k, v, positions, cos_sin, k_cache_flat, v_cache_flat, locs, q_out, k_out,
        kv_scale if fp8_cache else locs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0), k_cache_flat.stride(0), k_cache_flat.stride(1),
        hq, hkv,
        HALF=half, BLOCK_HQ=_pow2(hq), BLOCK_HKV=_pow2(hkv), BLOCK_HALF=_pow2(half),
        FP8_CACHE=fp8_cache, HW_CAST=hw_cast(k_cache_flat), USE_PDL=pdl, num_warps=4,
        **launch_options(pdl),
    )  # fmt: skip
    return q_out, k_out
