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

# Above this many rows cuBLAS's tensor-core tiles win (benchmarks/kernels.py, gemv sweep).
GEMV_MAX_ROWS = 8


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


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
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    n_mask = rn < N
    if BLOCK_M == 1:
        acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                x = tl.load(x_ptr + k0 + rk)
            else:
                k_mask = (k0 + rk) < K
                w = tl.load(
                    w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first",
                )  # fmt: skip
                x = tl.load(x_ptr + k0 + rk, mask=k_mask, other=0.0)
            acc1 += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc1 += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, acc1.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        # A few rows: one tensor-core dot per K block; rows beyond M are zeros. fp32 inputs (CPU
        # parity models) need exact products, not tf32.
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            else:
                k_mask = (k0 + rk) < K
                w = tl.load(
                    w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first",
                )  # fmt: skip
                x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemv_config(m: int, n: int, k: int) -> GemvConfig | None:
    """The launch config for an ``[m, k] x [n, k]^T`` product, or None to use cuBLAS.

    From the H100 sweep in ``benchmarks/RESULTS.md`` (``benchmarks/kernels.py --only gemv
    --sweep``), at the decode GEMMs of Llama-3.1-8B and Llama-3.2-1B:

    - one row: 8 columns x 512-wide K blocks per program beats cuBLAS by 2-12% on every shape
      except the long-K down projections (K > 2N), where cuBLAS's split-K is as fast or faster;
    - 2-8 rows (the tensor-core path): cuBLAS is as fast or faster except on the vocabulary
      projection (N >= 32768), where this kernel streams the weight 9% faster.
    """
    if m > GEMV_MAX_ROWS or k % 16 or n < 512:
        return None
    if m == 1:
        if k > 2 * n:
            return None
        return GemvConfig(block_n=8, block_k=min(512, _pow2_at_most(k)), num_warps=4, num_stages=4)
    if n < 32768:
        return None
    return GemvConfig(block_n=16, block_k=min(256, _pow2_at_most(k)), num_warps=4, num_stages=4)


def _pow2_at_most(k: int) -> int:
    return 1 << (k.bit_length() - 1)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: GemvConfig
) -> torch.Tensor:
    """``x @ weight.T + bias`` with an explicit config (the benchmark sweeps these)."""
    m, k = x.shape
    n = weight.shape[0]
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
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the GEMV kernel for few-row inputs (same signature and result)."""
    if x.dim() != 2:
        return F.linear(x, weight, bias)
    cfg = gemv_config(x.shape[0], weight.shape[0], weight.shape[1])
    if cfg is None:
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias, cfg)
