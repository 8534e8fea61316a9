"""Skinny linear layers for decode: ``y = x @ w.T (+ b)`` when ``x`` has only a few rows.

At batch 1-8 a decode step's GEMMs are matrix-vector products that should stream the weight at
HBM speed. cuBLAS picks tiles that leave SMs idle for some shapes: on the H100, Llama-3.1-8B's
``o_proj`` (4096 x 4096) runs on 64 CTAs at about 55% of HBM bandwidth, and Llama-3.2-1B's
``qkv``/``o_proj`` at about 54% (``benchmarks/step_profile.py``). Here each program owns
``BLOCK_N`` output columns over the whole of ``K``, so the grid has ``N / BLOCK_N`` programs
(512 for N = 4096 at one row), each streaming a contiguous slab of rows, and no split-K
reduction is needed: every output is summed in one program, in one order, so results are
deterministic.

``linear`` takes the GEMV path only where :func:`gemv_config` says it measured faster than
cuBLAS, and falls back to ``F.linear`` otherwise. The choice depends on shapes alone, so it is
fixed per captured graph.

Two variants fold the op that produces the GEMV's input into its loads: ``silu_mul_linear``
(the down projection on the gate/up output) and ``add_rms_norm_linear`` (a pre-norm, residual
add included, and the projection that reads it: qkv and gate/up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from graphrt.kernels.pdl import launch_options, pdl_enter, pdl_launch, pdl_wait
from graphrt.kernels.triton_ops import fused_add_rms_norm, rms_norm, silu_and_mul

# Above this many rows cuBLAS's tensor-core tiles win (benchmarks/kernel_bench.py, gemv sweep).
GEMV_MAX_ROWS = 8


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # The FP8 GEMV's multi-row path only (``triton_fp8.fp8_gemv``): programs per column block
    # along K, whose fp32 partial sums a second kernel adds in a fixed order.
    split_k: int = 1
    # The FP8 GEMV's multi-row path only: the weight block is the dot's first operand.
    swap_ab: bool = False


@triton.jit
def _load_x(x_ptr, k0, rk, K, SILU_MUL: tl.constexpr, EVEN: tl.constexpr):
    # One K block of the input row. With SILU_MUL the row is ``[gate | up]`` (width 2K) and the
    # block is silu(gate) * up, rounded where ``silu_and_mul`` rounds it.
    if EVEN:
        x = tl.load(x_ptr + k0 + rk)
    else:
        x = tl.load(x_ptr + k0 + rk, mask=(k0 + rk) < K, other=0.0)
    if SILU_MUL:
        if EVEN:
            up = tl.load(x_ptr + K + k0 + rk)
        else:
            up = tl.load(x_ptr + K + k0 + rk, mask=(k0 + rk) < K, other=0.0)
        g = x.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(x.dtype)
        x = (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype)
    return x


@triton.jit
def _load_w(w_ptrs, k0, rk, n_mask, K, EVEN: tl.constexpr):
    if EVEN:
        w = tl.load(w_ptrs, eviction_policy="evict_first")
    else:
        k_mask = (k0 + rk) < K
        w = tl.load(
            w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0,
            eviction_policy="evict_first",
        )  # fmt: skip
    return w


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SILU_MUL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    n_mask = rn < N
    if BLOCK_M == 1:
        # The first weight block is constant data: with PDL it streams in while the kernel
        # that writes x is still finishing. The loop then starts at the second block.
        w = _load_w(w_ptrs, 0, rk, n_mask, K, EVEN)
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        x = _load_x(x_ptr, 0, rk, K, SILU_MUL, EVEN)
        acc1 = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        w_ptrs += BLOCK_K
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w = _load_w(w_ptrs, k0, rk, n_mask, K, EVEN)
            x = _load_x(x_ptr, k0, rk, K, SILU_MUL, EVEN)
            acc1 += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc1 += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, acc1.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        # A few rows: one tensor-core dot per K block; rows beyond M are zeros. fp32 inputs (CPU
        # parity models) need exact products, not tf32.
        pdl_enter(USE_PDL)
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _load_w(w_ptrs, k0, rk, n_mask, K, EVEN)
            if EVEN:
                x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            else:
                k_mask = (k0 + rk) < K
                x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# At or below this many output columns a one-row GEMV needs narrow programs to fill the GPU.
NARROW_N = 3072


def gemv_config(m: int, n: int, k: int, silu_mul: bool = False) -> GemvConfig | None:
    """The launch config for an ``[m, k] x [n, k]^T`` product, or None to use cuBLAS.

    From the H100 sweeps in ``benchmarks/RUN_LOG.md`` (``benchmarks/kernel_bench.py --only gemv
    --sweep``), at the decode GEMMs of Llama-3.1-8B and Llama-3.2-1B:

    - one row, N <= 3072 (Llama-3.2-1B's qkv, o and down): 2 columns x 1024-wide K blocks per
      program (4 columns with SiLU fused), so even N = 2048 makes 1,024 programs. With PDL this
      ran qkv at 80% of HBM against 60% for 8-column programs and cuBLAS's 50%, o at 64%
      against 52% and 43%, and the down projection in 13.8 us against cuBLAS's 16.4 (14.4 us
      with SiLU fused, against 18.3 for the SiLU kernel then cuBLAS);
    - one row, wider: 8 columns x 512-wide K blocks beats cuBLAS by 2-12% on every shape except
      the long-K down projections (K > 2N), where cuBLAS's split-K is as fast or faster on its
      own. With ``silu_mul`` (the down projection reading the gate/up output) the GEMV is taken
      anyway: it saves the SiLU kernel and cuBLAS's split-K reduction kernel;
    - 2-8 rows (the tensor-core path): cuBLAS is as fast or faster except on the vocabulary
      projection (N >= 32768), where this kernel streams the weight 9% faster. ``silu_mul`` is
      one-row only.
    """
    if m > GEMV_MAX_ROWS or k % 16 or n < 512:
        return None
    if m == 1:
        if n <= NARROW_N:
            block_n, warps = (4, 8) if silu_mul else (2, 4)
            return GemvConfig(block_n, min(1024, _pow2_at_most(k)), warps, 4)
        if k > 2 * n and not silu_mul:
            return None
        return GemvConfig(block_n=8, block_k=min(512, _pow2_at_most(k)), num_warps=4, num_stages=4)
    if n < 32768 or silu_mul:
        return None
    return GemvConfig(block_n=16, block_k=min(256, _pow2_at_most(k)), num_warps=4, num_stages=4)


def _pow2_at_most(k: int) -> int:
    return 1 << (k.bit_length() - 1)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: GemvConfig,
    *,
    silu_mul: bool = False,
    pdl: bool = False,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with an explicit config (the benchmark sweeps these).

    With ``silu_mul``, ``x`` is a gate/up output ``[m, 2k]`` and the product is
    ``silu_and_mul(x) @ weight.T`` (one row only). ``pdl`` launches with programmatic dependent
    launch (:mod:`graphrt.kernels.pdl`).
    """
    m, kx = x.shape
    n, k = weight.shape
    if kx != (2 * k if silu_mul else k):
        raise ValueError(f"gemv: input width {kx} does not match weight {tuple(weight.shape)}")
    if silu_mul and m > 1:
        raise ValueError("gemv: silu_mul supports one row")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = 1 if m == 1 else 16
    # tl.dot needs every tile dimension >= 16.
    block_n = cfg.block_n if m == 1 else max(16, cfg.block_n)
    even = n % block_n == 0 and k % cfg.block_k == 0
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else x, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k,
        EVEN=even, DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        SILU_MUL=silu_mul, USE_PDL=pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(pdl),
    )  # fmt: skip
    return out


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pdl: bool = False
) -> torch.Tensor:
    """``F.linear`` with the GEMV kernel for few-row inputs (same signature and result)."""
    if x.dim() != 2:
        return F.linear(x, weight, bias)
    cfg = gemv_config(x.shape[0], weight.shape[0], weight.shape[1])
    if cfg is None:
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias, cfg, pdl=pdl)


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """``linear(silu_and_mul(x), weight)``: the MLP's down projection on its gate/up output.

    One row runs as a single GEMV that applies the activation as it loads ``x``; more rows run
    the SiLU kernel, then ``linear``.
    """
    if x.dim() == 2:
        cfg = gemv_config(x.shape[0], weight.shape[0], weight.shape[1], silu_mul=True)
        if cfg is not None and x.shape[0] == 1:
            return gemv(x, weight, None, cfg, silu_mul=True, pdl=pdl)
    return linear(silu_and_mul(x, pdl=pdl), weight, pdl=pdl)


# ---- RMSNorm folded into the GEMV ----------------------------------------------------------------


@triton.jit
def _load_act(ptrs, mask, EVEN: tl.constexpr):
    if EVEN:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v


@triton.jit
def _residual_sum(x_ptrs, r_ptrs, mask, HAS_RES: tl.constexpr, EVEN: tl.constexpr):
    # s = x + residual, formed in fp32 and rounded to the activation dtype where
    # fused_add_rms_norm rounds it; without a residual (a model's first layer) s is x.
    s = _load_act(x_ptrs, mask, EVEN)
    if HAS_RES:
        r = _load_act(r_ptrs, mask, EVEN)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(s.dtype)
    return s


@triton.jit
def _store_residual(ptrs, s, mask, pid, HAS_RES: tl.constexpr):
    # Program 0 stores the new residual; the others only read. (Two ifs: HAS_RES is a
    # constexpr, pid is not.)
    if HAS_RES:  # noqa: SIM102
        if pid == 0:
            tl.store(ptrs, s, mask=mask)


@triton.jit
def _normed(s, inv, nw):
    # The norm's output, rounded at the standalone kernels' two points: s * inv to the
    # activation dtype, then its product with the norm weight.
    xn = (s.to(tl.float32) * inv).to(s.dtype)
    return (xn.to(tl.float32) * nw.to(tl.float32)).to(s.dtype)


@triton.jit
def _norm_gemv_kernel(
    x_ptr,
    r_ptr,
    nw_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    res_out_ptr,
    M,
    N,
    K,
    eps,
    stride_xm,
    stride_rm,
    stride_wn,
    stride_om,
    stride_resm,
    HAS_RES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Every program needs its rows' full sum of squares before its first product, so it reads
    # x (and the residual) twice: pass 1 sums the squares of s = x + residual, pass 2 recomputes
    # s block by block, norms it and runs the GEMV of _gemv_kernel over it, in the same order.
    # Program 0 also stores s, the norm's second output, into a buffer that no program of this
    # grid reads; the kernels after this one read it after their pdl_wait, which returns once
    # the whole grid has completed.
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    n_mask = rn < N
    if BLOCK_M == 1:
        # The first weight block is constant data: with PDL it streams in while the kernel
        # that writes x is still finishing. Nothing else is touched before the wait.
        w = _load_w(w_ptrs, 0, rk, n_mask, K, EVEN)
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        s = _residual_sum(x_ptr + rk, r_ptr + rk, rk < K, HAS_RES, EVEN)
        _store_residual(res_out_ptr + rk, s, rk < K, pid, HAS_RES)
        sf = s.to(tl.float32)
        sq = tl.sum(sf * sf, axis=0)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            kk = k0 + rk
            s = _residual_sum(x_ptr + kk, r_ptr + kk, kk < K, HAS_RES, EVEN)
            _store_residual(res_out_ptr + kk, s, kk < K, pid, HAS_RES)
            sf = s.to(tl.float32)
            sq += tl.sum(sf * sf, axis=0)
        inv = tl.rsqrt(sq / K + eps)
        s = _residual_sum(x_ptr + rk, r_ptr + rk, rk < K, HAS_RES, EVEN)
        h = _normed(s, inv, _load_act(nw_ptr + rk, rk < K, EVEN))
        acc1 = tl.sum(w.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
        w_ptrs += BLOCK_K
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w = _load_w(w_ptrs, k0, rk, n_mask, K, EVEN)
            kk = k0 + rk
            s = _residual_sum(x_ptr + kk, r_ptr + kk, kk < K, HAS_RES, EVEN)
            h = _normed(s, inv, _load_act(nw_ptr + kk, kk < K, EVEN))
            acc1 += tl.sum(w.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc1 += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, acc1.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        # A few rows: per-row sums of squares, then one tensor-core dot per K block, as in
        # _gemv_kernel. Rows beyond M load zeros, so their normed values are zeros too.
        pdl_enter(USE_PDL)
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        r_ptrs = r_ptr + rm[:, None] * stride_rm + rk[None, :]
        res_ptrs = res_out_ptr + rm[:, None] * stride_resm + rk[None, :]
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = m_mask[:, None] & ((k0 + rk) < K)[None, :]
            s = _residual_sum(x_ptrs + k0, r_ptrs + k0, mask, HAS_RES, False)
            _store_residual(res_ptrs + k0, s, mask, pid, HAS_RES)
            sf = s.to(tl.float32)
            sq += tl.sum(sf * sf, axis=1)
        inv = tl.rsqrt(sq / K + eps)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _load_w(w_ptrs, k0, rk, n_mask, K, EVEN)
            k_mask = (k0 + rk) < K
            s = _residual_sum(x_ptrs + k0, r_ptrs + k0, m_mask[:, None] & k_mask[None, :],
                              HAS_RES, False)  # fmt: skip
            nw = tl.load(nw_ptr + k0 + rk, mask=k_mask, other=0.0)
            h = _normed(s, inv, nw[None, :])
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: GemvConfig,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm_linear`` in one kernel with an explicit config (the benchmark sweeps
    these): returns ``(rms_norm(x + residual) @ weight.T + bias, x + residual)``, or with
    ``residual`` None ``(rms_norm(x) @ weight.T + bias, x)``.

    The new residual is a new tensor (``x`` itself without a residual); neither input is
    modified. Every tensor has ``x``'s dtype.
    """
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or norm_weight.shape != (k,):
        raise ValueError(
            f"norm_gemv: input width {k} does not match weight {tuple(weight.shape)} or norm "
            f"weight {tuple(norm_weight.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"norm_gemv: residual {tuple(residual.shape)} is not x's {(m, k)}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = x if residual is None else torch.empty((m, k), dtype=x.dtype, device=x.device)
    launch_norm_gemv(x, residual, norm_weight, weight, bias, out, res_out, eps, cfg, pdl)
    return out, res_out


def launch_norm_gemv(x, residual, norm_weight, weight, bias, out, res_out, eps, cfg, pdl) -> None:
    """The fused norm + GEMV kernel with explicit outputs (what :func:`norm_gemv` runs; the
    tests poison outputs through it). ``res_out`` is written only when ``residual`` is given;
    it must not overlap any input, since other programs read those while program 0 writes."""
    m, k = x.shape
    n = weight.shape[0]
    if m == 0:
        return
    x = x if x.stride(1) == 1 else x.contiguous()
    r = x if residual is None else residual
    r = r if r.stride(1) == 1 else r.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    block_m = 1 if m == 1 else 16
    block_n = cfg.block_n if m == 1 else max(16, cfg.block_n)  # tl.dot: every dim >= 16
    even = n % block_n == 0 and k % cfg.block_k == 0
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, r, norm_weight.contiguous(), weight, bias if bias is not None else x, out, res_out,
        m, n, k, eps, x.stride(0), r.stride(0), weight.stride(0), out.stride(0), res_out.stride(0),
        HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=cfg.block_k, EVEN=even,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None, USE_PDL=pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(pdl),
    )  # fmt: skip


def norm_gemv_config(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> GemvConfig | None:
    """The config :func:`add_rms_norm_linear` runs the fused kernel with, or None to run the
    norm and ``linear`` apart: ``linear``'s own choice (:func:`gemv_config`) for the shape, so
    the two paths run the same GEMV, where every tensor is 2-D (the norm weight 1-D) of one
    dtype. Shapes and dtypes only, so the choice is fixed per captured graph."""
    if not norm_operands_fit(x, residual, norm_weight, bias):
        return None
    if weight.dtype != x.dtype or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        return None
    return gemv_config(x.shape[0], weight.shape[0], weight.shape[1])


def norm_operands_fit(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> bool:
    """Whether the fused norm + GEMV kernels take these activation-side operands: ``x`` 2-D,
    the residual (if any) of its shape, the norm weight ``[K]``, all of ``x``'s dtype, as is
    the bias (the weight is the caller's to check: plain or e4m3)."""
    if x.dim() != 2 or norm_weight.shape != (x.shape[1],):
        return False
    if residual is not None and residual.shape != x.shape:
        return False
    return all(t is None or t.dtype == x.dtype for t in (residual, norm_weight, bias))


@triton.jit
def _norm_gemv_one_pass_kernel(
    x_ptr,
    r_ptr,
    nw_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    res_out_ptr,
    N,
    K,
    eps,
    stride_wn,
    HAS_RES: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One row in one pass: y = (W (s * g)) * rsqrt(mean(s^2) + eps) (* row scale) + b, with
    # s = x + residual. The norm's factor is one scalar per row, so it can come out of the
    # dot: each program sums s^2 over the very loads its product uses, and the weight streams
    # from the first block on. (_norm_gemv_kernel keeps the standalone norm's rounding points
    # and so needs the factor first: it reads the activations twice, the weight only after.)
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    # Weights, row scales and the norm weight are constant data: loaded before the PDL wait,
    # while the kernel that writes x finishes.
    if HAS_SCALE:
        scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0)
    w = _load_w(w_ptrs, 0, rk, n_mask, K, EVEN)
    g = _load_act(nw_ptr + rk, rk < K, EVEN)
    pdl_wait(USE_PDL)
    pdl_launch(USE_PDL)
    s = _residual_sum(x_ptr + rk, r_ptr + rk, rk < K, HAS_RES, EVEN)
    _store_residual(res_out_ptr + rk, s, rk < K, pid, HAS_RES)
    sf = s.to(tl.float32)
    sq = tl.sum(sf * sf, axis=0)
    acc = tl.sum(w.to(tl.float32) * (sf * g.to(tl.float32))[None, :], axis=1)
    w_ptrs += BLOCK_K
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        w = _load_w(w_ptrs, k0, rk, n_mask, K, EVEN)
        g = _load_act(nw_ptr + kk, kk < K, EVEN)
        s = _residual_sum(x_ptr + kk, r_ptr + kk, kk < K, HAS_RES, EVEN)
        _store_residual(res_out_ptr + kk, s, kk < K, pid, HAS_RES)
        sf = s.to(tl.float32)
        sq += tl.sum(sf * sf, axis=0)
        acc += tl.sum(w.to(tl.float32) * (sf * g.to(tl.float32))[None, :], axis=1)
        w_ptrs += BLOCK_K
    acc = acc * tl.rsqrt(sq / K + eps)
    if HAS_SCALE:
        acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def norm_gemv_one_pass(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    cfg: GemvConfig,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm_linear`` for one row in one pass over its inputs, with an explicit
    config: ``(y, x + residual)`` with ``y = rms_norm(x + residual) @ w.T + bias``, where ``w``
    is ``weight`` (bf16/fp16/fp32, ``scale`` None) or an e4m3 ``weight`` times its fp32 row
    ``scale`` (:mod:`graphrt.kernels.triton_fp8`'s layout, upcast in registers).

    The norm's factor is applied after the fp32 sum, so the normed row is never rounded to
    the activation dtype: the result is within a rounding or so of the composed path, not bit
    equal to it (:func:`norm_gemv` is). The new residual is rounded where
    ``fused_add_rms_norm`` rounds it, and is a new tensor (``x`` itself without a residual).
    """
    m, k = x.shape
    n = weight.shape[0]
    if m != 1:
        raise ValueError(f"norm_gemv_one_pass: one row only, got {m}")
    if weight.shape[1] != k or norm_weight.shape != (k,):
        raise ValueError(
            f"norm_gemv_one_pass: input width {k} does not match weight "
            f"{tuple(weight.shape)} or norm weight {tuple(norm_weight.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"norm_gemv_one_pass: residual {tuple(residual.shape)} is not {(m, k)}")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (n,)):
        raise ValueError(f"norm_gemv_one_pass: want fp32 [{n}] row scales, got {scale.dtype} "
                         f"{tuple(scale.shape)}")  # fmt: skip
    x = x if x.stride(1) == 1 else x.contiguous()
    r = x if residual is None else residual
    r = r if r.stride(1) == 1 else r.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    res_out = x if residual is None else torch.empty_like(x)
    even = n % cfg.block_n == 0 and k % cfg.block_k == 0
    _norm_gemv_one_pass_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, r, norm_weight.contiguous(), weight, scale if scale is not None else x,
        bias if bias is not None else x, out, res_out, n, k, eps, weight.stride(0),
        HAS_RES=residual is not None, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN=even, USE_PDL=pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(pdl),
    )  # fmt: skip
    return out, res_out


def composed_add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused path of :func:`add_rms_norm_linear`: :func:`pre_norm`, then ``linear``."""
    h, residual = pre_norm(x, residual, norm_weight, eps, pdl=pdl)
    return linear(h, weight, bias, pdl=pdl), residual


def pre_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's pre-norm on its own kernel: ``(normed, new residual)``, by
    ``fused_add_rms_norm`` (in place where it can be) or, with ``residual`` None, ``rms_norm``
    with ``x`` as the new residual. The unfused half of every norm + projection op."""
    if residual is None:
        return rms_norm(x, norm_weight, eps, pdl=pdl), x
    return fused_add_rms_norm(x, residual, norm_weight, eps, pdl=pdl)


def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(h, weight, bias), s)`` with ``h, s = fused_add_rms_norm(x, residual, ...)``; with
    ``residual`` None (a model's first layer), ``h = rms_norm(x)`` and ``s`` is ``x``.

    Where ``linear`` would run the GEMV (few rows, :func:`norm_gemv_config`), one kernel does
    both: the norm's launch and its round trip through memory go. Otherwise the two kernels run
    as before. The new residual is always returned; callers must not rely on the inputs being
    overwritten (the fused kernel leaves them as they are).
    """
    cfg = norm_gemv_config(x, residual, norm_weight, weight, bias)
    if cfg is None:
        return composed_add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, pdl=pdl)
    return norm_gemv(x, residual, norm_weight, eps, weight, bias, cfg, pdl=pdl)
