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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from graphrt.kernels.pdl import launch_options, pdl_enter, pdl_launch, pdl_wait
from graphrt.kernels.triton_ops import silu_and_mul

# Above this many rows cuBLAS's tensor-core tiles win (benchmarks/kernel_bench.py, gemv sweep).
GEMV_MAX_ROWS = 8


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


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
