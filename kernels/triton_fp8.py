"""FP8-weight linear layers on the GPU: ``y = x @ (q * s[:, None]).T (+ b)`` for e4m3 ``q``
``[N, K]`` with one fp32 scale per output channel ``s`` ``[N]`` (the layout of
:mod:`graphrt.models.fp8`), activations ``x`` ``[M, K]`` in bf16, fp16 or fp32.

Two paths, chosen from shapes alone (so the choice is fixed per captured graph):

- **A few rows** (one to 16; one to 64 where W8A8 cannot take the operands): a weight-only
  FP8 GEMV, laid out as the bf16 one (:mod:`graphrt.kernels.triton_gemv`): each program owns
  ``BLOCK_N`` output columns. It streams one byte per weight, upcasts in registers (exact:
  every e4m3 value is a bf16, fp16 and fp32 value), accumulates in fp32 and applies the row
  scale once at the end (``sum_k x q s = s sum_k x q``: the scale belongs to the output
  channel). One row reduces on the CUDA cores over all of ``K``; 2-16 rows run one tensor-core
  ``tl.dot`` per K block in the activation dtype. A ``silu_mul`` variant reads the gate/up
  output ``[M, 2K]`` and applies SiLU-and-mul as it loads (the down projection, one row, as in
  the bf16 GEMV). With ``GemvConfig.split_k`` (the narrower layers at 2-16 rows) programs also
  split K, each writing an fp32 partial sum that a second kernel adds in a fixed order: no
  atomics, so the result is the same at every run.
- **More rows: W8A8.** One Triton kernel quantizes each activation row to e4m3 on the device
  (``scale = amax(|row|) / 448``, the weights' recipe; no host sync, nothing sized by values),
  then the product runs on the fp8 tensor cores with row-wise scales: at 17-64 rows in the
  GEMV's W8A8 mode (:func:`fp8_w8a8_gemv`: the dot on e4m3 operands, the weight block as its
  first operand, both scales after the fp32 sum; faster than cuBLAS and than the bf16-dot GEMV
  at these rows, s26a and s29a), above that ``torch._scaled_mm``. Where a pre-norm feeds the
  product (``add_rms_norm_linear``), the norm kernel quantizes its output rows itself
  (:func:`norm_quantize_rows_fp8`). Per-token scales keep rows independent: a graph bucket's
  padding rows cannot move a real row's scale, as a per-tensor scale would.

Anything else takes the torch reference (dequantize, then ``F.linear``): GPUs before sm_89
(neither Triton nor cuBLAS has e4m3 there), and above the GEMV bound, fp16/fp32 activations
(``_scaled_mm``'s row-wise path is bf16-only in some torch releases) or a K or N that is not a
multiple of 16 (``_scaled_mm`` refuses them); at 17-64 rows those operands take the GEMV.

Numerics against :func:`graphrt.kernels.reference.fp8_linear`, which rounds the dequantized
weight to the activation dtype before its matmul: the GEMV does not round the weight, so it is
the closer of the two to exact arithmetic (``tests/test_fp8_kernels.py`` checks it is within one
rounding of the exact product). W8A8 adds e4m3 rounding of the activations: about 2.6% relative
(norm-wise) error on random inputs, as much as the weights' own quantization.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace

import torch
import triton
import triton.language as tl

from graphrt.kernels import reference
from graphrt.kernels.pdl import launch_options, pdl_enter, pdl_launch, pdl_wait
from graphrt.kernels.triton_e4m3 import (
    _FP8_MAX,
    _MIN_AMAX,
    FP8_MAX,
    MIN_AMAX,
    hw_cast,
    to_e4m3_inv,
)
from graphrt.kernels.triton_gemv import (
    NARROW_N,
    GemvConfig,
    _load_w,
    _load_x,
    _pow2_at_most,
    norm_gemv_one_pass,
    norm_operands_fit,
    pre_norm,
)
from graphrt.kernels.triton_ops import silu_and_mul

FP8_DTYPE = torch.float8_e4m3fn

# The GEMV kernel's row bound: up to FEW_ROWS_MAX rows the weight-only GEMV, then to
# FP8_GEMV_MAX_ROWS its W8A8 mode (the weight-only one where W8A8 cannot take the operands).
# At 64 rows the W8A8 mode beat the weight-only GEMV's best configs on each of Llama-3.1-8B's
# layers (qkv 14.3 against 18.6 us, o 12.0 against 14.5, down 31.6 against 36.4; s29a/s29b).
FP8_GEMV_MAX_ROWS = 64
FEW_ROWS_MAX = 16
# Output width from which a layer counts as wide: enough column blocks to fill the SMs on
# wider blocks (the gate/up projections).
WIDE_N = 16384

# Launch configs by shape, the fastest of kernel_bench.py --only fp8 --sweep (8B shapes, median
# us, H100). One row, wide N (s26a): qkv 10.0, o 6.8, gate_up 39.0, down 21.1, against 12.5,
# 8.5, 42.0, 24.6 for 8-column, 1024-long blocks on 8 warps (the best for qkv, 9.8, is within
# 3%). The narrow one-row configs (the 1B's shapes) are unmeasured starting points. Several
# rows (s25b): at 16 rows qkv 15.5, o 11.5, down 32.0 (FEW_ROWS; 16-column blocks without
# split K took 19.4, 13.5, 42.2) and gate_up 47.6 (FEW_ROWS_WIDE; 73.6).
ONE_ROW_NARROW = GemvConfig(block_n=2, block_k=2048, num_warps=4, num_stages=4)  # N <= 3072
ONE_ROW_NARROW_SILU = GemvConfig(block_n=4, block_k=2048, num_warps=8, num_stages=4)
ONE_ROW_WIDE = GemvConfig(block_n=4, block_k=2048, num_warps=4, num_stages=4)
# The down projection with SiLU-and-mul on load, wide N (s27a, session 26): 21.6 us against
# 24.4 us on ONE_ROW_WIDE. Each program computes SiLU over the whole gate/up row, so wider
# column blocks (fewer programs) pay it fewer times.
ONE_ROW_WIDE_SILU = GemvConfig(block_n=16, block_k=2048, num_warps=8, num_stages=4)
FEW_ROWS = GemvConfig(block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=2)
FEW_ROWS_WIDE = GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3)
MANY_ROWS = GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=4, swap_ab=True)
# W8A8 at 17-64 rows, the GEMV's W8A8 mode for every layer (session 28, the fastest of
# kernel_bench.py --only fp8 --sweep at 32 and 64 rows, runs s29a and s29b; median us at 64
# rows): wide N on 128-column blocks, 8 warps, 8B gate/up 48.0 (48.6 on the 64-column blocks
# before); the rest on 64-column blocks, 256-long K blocks and five stages, 8B qkv 14.3, o
# 12.0, down 31.6, against the bf16-dot GEMV's (MANY_ROWS) 18.6, 14.5, 36.4. Of 166 configs
# this one is within 3% of the fastest for each of those layers at 32 and at 64 rows. Wider
# column blocks were slower (each program's tile of x is as large as its weight tile at 64
# columns), and so was split K (its sum costs a launch).
W8A8_WIDE = GemvConfig(block_n=128, block_k=128, num_warps=8, num_stages=3, swap_ab=True)
W8A8_NARROW = GemvConfig(block_n=64, block_k=256, num_warps=4, num_stages=5, swap_ab=True)
# The pre-norm folded into the one-row GEMV (``add_rms_norm_linear``): each program also reads
# K values of the residual and of the norm weight, so its column blocks are wider than the
# plain GEMV's, to keep those L2 reads a smaller share of its traffic. The fastest of s27b's
# sweep (kernel_bench.py --only fp8 --sweep --gemv-rows 1, median us, norm + GEMV against the
# norm kernel then the GEMV): Llama-3.1-8B qkv 10.87 against 11.83 (NORM_ONE_ROW), gate/up
# 40.26 against 40.90 (NORM_ONE_ROW_WIDE, N >= WIDE_N); Llama-3.2-1B qkv 3.28 against 5.24
# (NORM_ONE_ROW_NARROW), gate/up 12.75 against 14.46 (WIDE; 12.65 for 16 x 1024 blocks).
NORM_ONE_ROW_NARROW = GemvConfig(block_n=8, block_k=2048, num_warps=4, num_stages=4)
NORM_ONE_ROW = GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=4)
NORM_ONE_ROW_WIDE = GemvConfig(block_n=8, block_k=2048, num_warps=4, num_stages=4)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=16)
def _cuda_has_fp8(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_supported(device: torch.device) -> bool:
    """True where these kernels can run on ``device``: CUDA sm_89+ (Triton's and cuBLAS's e4m3),
    or the CPU under ``TRITON_INTERPRET=1`` (the GEMV and the quantizer; no ``_scaled_mm``)."""
    if device.type == "cuda":
        return _cuda_has_fp8(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    return _INTERPRET and device.type == "cpu"


def fp8_gemv_config(
    m: int, n: int, k: int, silu_mul: bool = False, w8a8: bool = True
) -> GemvConfig | None:
    """The GEMV's launch config for ``[m, k] x [n, k]^T``, or None where W8A8 runs instead:
    above the row bound, and past 16 rows when ``w8a8`` (whether :func:`w8a8_supported` takes
    the operands).

    Unlike the bf16 GEMV there is no cuBLAS to hand narrow or long-K shapes to (the fallback
    would dequantize the whole weight), so every shape up to the bound takes the kernel."""
    if m < 1 or m > FP8_GEMV_MAX_ROWS:
        return None
    if m == 1:
        if n > NARROW_N:
            cfg = ONE_ROW_WIDE_SILU if silu_mul else ONE_ROW_WIDE
        else:
            cfg = ONE_ROW_NARROW_SILU if silu_mul else ONE_ROW_NARROW
    elif m <= FEW_ROWS_MAX:
        cfg = FEW_ROWS_WIDE if n >= WIDE_N else FEW_ROWS
    elif w8a8:
        return None
    else:
        cfg = MANY_ROWS
    return replace(cfg, block_k=min(cfg.block_k, _pow2_at_most(k)))


def fp8_w8a8_gemv_config(m: int, n: int, k: int) -> GemvConfig | None:
    """The config of :func:`fp8_w8a8_gemv` where the dispatch runs it: within the GEMV's row
    bound where ``fp8_gemv_config`` hands the layer to W8A8 (17-64 rows), wide N or not; else
    None (``_scaled_mm`` past the bound)."""
    if 1 <= m <= FP8_GEMV_MAX_ROWS and fp8_gemv_config(m, n, k) is None:
        cfg = W8A8_WIDE if n >= WIDE_N else W8A8_NARROW
        return replace(cfg, block_k=min(cfg.block_k, _pow2_at_most(k)))
    return None


def fp8_norm_gemv_config(m: int, n: int, k: int) -> GemvConfig | None:
    """The config of the pre-norm folded into the GEMV (:func:`add_rms_norm_linear`): one row
    only; None elsewhere (the norm kernel, then :func:`fp8_linear`)."""
    if m != 1:
        return None
    if n >= WIDE_N:
        cfg = NORM_ONE_ROW_WIDE
    else:
        cfg = NORM_ONE_ROW if n > NARROW_N else NORM_ONE_ROW_NARROW
    return replace(cfg, block_k=min(cfg.block_k, _pow2_at_most(k)))


# ---- the GEMV ---------------------------------------------------------------------------------


@triton.jit
def _load_x_rows(x_ptrs, k0, rk, m_mask, K, SILU_MUL: tl.constexpr, EVEN: tl.constexpr):
    # One [BLOCK_M, BLOCK_K] block of the input rows; with SILU_MUL each row is [gate | up]
    # (width 2K) and the block is silu(gate) * up, rounded where silu_and_mul rounds it.
    if EVEN:
        mask = m_mask[:, None]
    else:
        mask = m_mask[:, None] & ((k0 + rk) < K)[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if SILU_MUL:
        up = tl.load(x_ptrs + K, mask=mask, other=0.0)
        g = x.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(x.dtype)
        x = (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype)
    return x


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    part_ptr,
    K_SPLIT,
    xs_ptr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SILU_MUL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    X_FP8: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    # Row scales are weights too: constant data, read before any PDL wait.
    scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0)
    if BLOCK_M == 1:
        # As the bf16 GEMV: the first weight block streams in while the kernel that writes x
        # finishes (with PDL); the loop starts at the second block.
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
        acc1 = acc1 * scale
        if HAS_BIAS:
            acc1 += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, acc1.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        # A few rows: the weight block upcast to the activation dtype (exact), one tensor-core
        # dot per K block with fp32 accumulation; rows beyond M are zeros. fp32 activations
        # need exact products, not tf32.
        pdl_enter(USE_PDL)
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        # With SPLIT_K, program (pid, s) sums K from s * K_SPLIT (a multiple of BLOCK_K) on.
        if SPLIT_K > 1:
            k_lo = tl.program_id(1) * K_SPLIT
            k_hi = tl.minimum(k_lo + K_SPLIT, K)
        else:
            k_lo = 0
            k_hi = K
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo + rk)[None, :]
        w_ptrs += k_lo
        if SWAP_AB:
            # The weight block as the dot's first operand ([BLOCK_N, BLOCK_K] x [BLOCK_K,
            # BLOCK_M]): the wide side of the tile is then the one a Hopper warpgroup MMA
            # needs at least 64 of, and the few rows are the narrow one (vLLM's CUTLASS FP8
            # kernels swap A and B for small M the same way).
            acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                w = _load_w(w_ptrs, k0, rk, n_mask, K, EVEN)
                x = _load_x_rows(x_ptrs, k0, rk, m_mask, K, SILU_MUL, EVEN)
                acc_t = tl.dot(w.to(x.dtype), tl.trans(x), acc_t, input_precision=DOT_PRECISION)
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
            acc = tl.trans(acc_t)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                w = _load_w(w_ptrs, k0, rk, n_mask, K, EVEN)
                x = _load_x_rows(x_ptrs, k0, rk, m_mask, K, SILU_MUL, EVEN)
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
        if X_FP8:  # e4m3 rows (W8A8): each row's sum times its quantization scale
            acc = acc * tl.load(xs_ptr + rm, mask=m_mask, other=0.0)[:, None]
        mn_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K > 1:  # the partial sum; _splitk_sum_kernel applies the weight's scale
            p_ptrs = part_ptr + (tl.program_id(1) * M + rm)[:, None] * N + rn[None, :]
            tl.store(p_ptrs, acc, mask=mn_mask)
        else:
            acc = acc * scale[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mn_mask)


@triton.jit
def _splitk_sum_kernel(
    part_ptr, s_ptr, b_ptr, out_ptr, M, N, stride_om, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # out[m, n] = (sum over s of part[s, m, n], in order s = 0, 1, ...) * scale[n] + bias[n]
    row = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_mask = rn < N
    scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0)
    pdl_enter(USE_PDL)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + row) * N + rn, mask=n_mask, other=0.0)
    acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, silu_mul: bool) -> None:
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != (2 * k if silu_mul else k):
        raise ValueError(f"fp8: input shape {tuple(x.shape)} does not match weight {(n, k)}")
    if weight.dtype != FP8_DTYPE or scale.dtype != torch.float32 or scale.shape != (n,):
        raise ValueError(
            f"fp8: want a float8_e4m3fn weight and fp32 [{n}] scales, got {weight.dtype} and "
            f"{scale.dtype} {tuple(scale.shape)}"
        )


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: GemvConfig,
    *,
    silu_mul: bool = False,
    pdl: bool = False,
) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` by the FP8 GEMV with an explicit config (the
    benchmark sweeps these); any row count (the dot tile grows past 16 rows).

    With ``silu_mul``, ``x`` is a gate/up output ``[m, 2k]`` and the product is taken on
    ``silu_and_mul(x)``. ``pdl`` launches one row with programmatic dependent launch; several
    rows always launch without it."""
    _check(x, weight, scale, silu_mul)
    # The multi-row path has no weight prefetch before its wait to overlap, and with PDL the
    # Llama-3.1-8B batch-8 step took 6.84 ms against 5.73 without (H100, runs s25a and s25b,
    # 16-column configs): launched plainly, as cuBLAS is for bf16 at these rows.
    return _launch_gemv(
        x, None, weight, scale, bias, cfg, silu_mul, pdl and x.shape[0] == 1, x.dtype
    )


def fp8_w8a8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: GemvConfig,
    *,
    silu_mul: bool = False,
    pdl: bool = False,
) -> torch.Tensor:
    """W8A8 through the GEMV kernel: ``x`` quantized per row (:func:`quantize_rows_fp8`, with
    SiLU-and-mul on load if ``silu_mul``), then the multi-row path's dot on e4m3 operands (the
    FP8 tensor cores, no upcast) with fp32 sums scaled by both row scales; what
    :func:`graphrt.kernels.reference.fp8_w8a8_linear` computes. Faster than ``_scaled_mm``
    for the wide layers past 16 rows (``kernel_bench.py --only fp8 --sweep``, s26a) and than
    the weight-only GEMV for the narrow ones (s29a), and dispatched for every layer at 17-64
    rows (:func:`fp8_w8a8_gemv_config`). ``pdl`` applies to the quantizer."""
    _check(x, weight, scale, silu_mul)
    xq, xs = quantize_rows_fp8(x, silu_mul=silu_mul, pdl=pdl)
    return _launch_gemv(xq, xs, weight, scale, bias, cfg, False, False, x.dtype)


def warm_up_w8a8_gemv(m: int, weight: torch.Tensor, cfg: GemvConfig) -> None:
    """Compiles :func:`fp8_w8a8_gemv`'s kernels for ``m`` rows at ``cfg`` without launching
    them (a benchmark's sweep compiles its configs on a thread pool this way)."""
    n, k = weight.shape
    xq = torch.zeros((m, k), dtype=FP8_DTYPE, device=weight.device)
    xs = torch.ones((m, 1), dtype=torch.float32, device=weight.device)
    scale = torch.ones(n, dtype=torch.float32, device=weight.device)
    _launch_gemv(xq, xs, weight, scale, None, cfg, False, False, torch.bfloat16, warmup=True)


def _launch_gemv(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: GemvConfig,
    silu_mul: bool,
    pdl: bool,
    out_dtype: torch.dtype,
    *,
    warmup: bool = False,
) -> torch.Tensor:
    """The GEMV's launch (and split K's sum); ``x_scale``: ``x`` is e4m3 rows with these
    ``[m, 1]`` scales, run on the dot path whatever ``m``. ``warmup`` compiles the kernels
    without launching them."""
    m = x.shape[0]
    n, k = weight.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    dot = m > 1 or x_scale is not None
    block_m = max(16, triton.next_power_of_2(m)) if dot else 1
    # tl.dot needs every tile dimension >= 16.
    block_n = max(16, cfg.block_n) if dot else cfg.block_n
    block_k = max(16, cfg.block_k) if dot else cfg.block_k
    even = n % block_n == 0 and k % block_k == 0
    if cfg.split_k < 1 or (cfg.split_k > 1 and not dot):
        raise ValueError(f"fp8 GEMV: split_k={cfg.split_k} (>= 1, and 1 for one row)")
    # Each split covers whole K blocks; the last may be shorter, and none is empty.
    k_split = triton.cdiv(triton.cdiv(k, cfg.split_k), block_k) * block_k
    splits = triton.cdiv(k, k_split)
    part = out
    if splits > 1:
        part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    b = bias if bias is not None else scale
    grid = (triton.cdiv(n, block_n), splits)
    args = (
        x, weight, scale, b, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0), part, k_split,
        x_scale if x_scale is not None else scale,
    )  # fmt: skip
    kwargs = dict(
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN=even, DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        SILU_MUL=silu_mul, SPLIT_K=splits, SWAP_AB=cfg.swap_ab and dot,
        X_FP8=x_scale is not None, USE_PDL=pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(pdl),
    )  # fmt: skip
    if warmup:
        _fp8_gemv_kernel.warmup(*args, grid=grid, **kwargs)
    else:
        _fp8_gemv_kernel[grid](*args, **kwargs)
    if splits > 1:
        block = min(1024, triton.next_power_of_2(n))
        grid = (m, triton.cdiv(n, block))
        args = (part, scale, b, out, m, n, out.stride(0))
        kwargs = dict(
            HAS_BIAS=bias is not None, SPLIT_K=splits, BLOCK=block, USE_PDL=pdl, num_warps=4,
            **launch_options(pdl),
        )  # fmt: skip
        if warmup:
            _splitk_sum_kernel.warmup(*args, grid=grid, **kwargs)
        else:
            _splitk_sum_kernel[grid](*args, **kwargs)
    return out


# ---- W8A8: per-token activation quantization, then _scaled_mm ----------------------------------


@triton.jit
def _row_scale(abs_x):
    # A row's e4m3 scale from its absolute values (any block shape), amax / 448 (a zero row's
    # finite), and its reciprocal, by which the row is multiplied. IEEE division (div_rn), as
    # torch divides tensors: the scales and values match the reference's bits.
    scale = tl.math.div_rn(tl.maximum(tl.max(abs_x, axis=0), _MIN_AMAX), _FP8_MAX)
    return scale, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xm,
    stride_qm,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    SILU_MUL: tl.constexpr,
    USE_PDL: tl.constexpr,
    HW_CAST: tl.constexpr,
):
    # One program per row: its amax, then the row again (from L1/L2), multiplied by the scale's
    # reciprocal and rounded; a row that fits one block stays in registers, one pass over memory.
    row = tl.program_id(0).to(tl.int64)
    pdl_enter(USE_PDL)
    x_row = x_ptr + row * stride_xm
    rk = tl.arange(0, BLOCK_K)
    if BLOCK_K >= K:
        xf = _load_x(x_row, 0, rk, K, SILU_MUL, EVEN).to(tl.float32)
        scale, inv = _row_scale(tl.abs(xf))
        q = to_e4m3_inv(xf, inv, HW_CAST)
        if EVEN:
            tl.store(q_ptr + row * stride_qm + rk, q.to(q_ptr.dtype.element_ty))
        else:
            tl.store(q_ptr + row * stride_qm + rk, q.to(q_ptr.dtype.element_ty), mask=rk < K)
        tl.store(s_ptr + row, scale)
        return
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_x(x_row, k0, rk, K, SILU_MUL, EVEN)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale, inv = _row_scale(amax)
    for k0 in range(0, K, BLOCK_K):
        x = _load_x(x_row, k0, rk, K, SILU_MUL, EVEN)
        q = to_e4m3_inv(x.to(tl.float32), inv, HW_CAST)
        q_ptrs = q_ptr + row * stride_qm + k0 + rk
        if EVEN:
            tl.store(q_ptrs, q.to(q_ptr.dtype.element_ty))
        else:
            tl.store(q_ptrs, q.to(q_ptr.dtype.element_ty), mask=(k0 + rk) < K)
    tl.store(s_ptr + row, scale)


QUANT_ONE_PASS_MAX = 16384


def quantize_rows_fp8(
    x: torch.Tensor, *, silu_mul: bool = False, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) e4m3 quantization of ``x`` ``[M, K]``: ``(q, scale)`` with ``q``
    ``float8_e4m3fn`` ``[M, K]`` (contiguous) and ``scale`` fp32 ``[M, 1]``, the bits of
    :func:`graphrt.kernels.reference.quantize_rows_fp8`. With ``silu_mul`` the rows are
    ``silu_and_mul(x)`` (``x`` is ``[M, 2K]``), computed on load. Capturable: one launch, shapes
    from ``x`` alone."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows_fp8 takes a 2-D input, got shape {tuple(x.shape)}")
    m, kx = x.shape
    k = kx // 2 if silu_mul else kx
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scale.fill_(MIN_AMAX / FP8_MAX)
    # The whole row in one block up to 16K values (an 8B down projection's 14,336): one pass,
    # all its loads in flight at once. A graph's 64 rows are only 64 programs, so the two-pass
    # loop over 2K blocks was latency-bound: 5.6 us a call, 356 us of an 8B FP8 step at batch
    # 64 for the o and down projections' inputs (s29b, step_profile). Past the bound, blocks
    # no longer than it, so that such a row always spans several (the kernel's two-pass path).
    block_k = triton.next_power_of_2(k) if k <= QUANT_ONE_PASS_MAX else 2048
    _quantize_rows_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        BLOCK_K=block_k, EVEN=k % block_k == 0, SILU_MUL=silu_mul, USE_PDL=pdl,
        HW_CAST=hw_cast(x), num_warps=max(4, min(16, block_k // 512)), **launch_options(pdl),
    )  # fmt: skip
    return q, scale


@triton.jit
def _norm_quantize_rows_kernel(
    x_ptr,
    r_ptr,
    nw_ptr,
    q_ptr,
    s_ptr,
    res_out_ptr,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
    HW_CAST: tl.constexpr,
):
    # One row per program, held in registers: the residual add and the norm as the norm kernels
    # compute them (the sum rounded to the activation dtype, the normed row rounded before and
    # after the weight), then the quantizer's amax, division and rounding on the normed row.
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * n_cols + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    xn = (xf * inv).to(x.dtype)
    w = tl.load(nw_ptr + cols, mask=mask, other=0.0)
    h = (xn.to(tl.float32) * w.to(tl.float32)).to(x.dtype).to(tl.float32)
    scale, inv_scale = _row_scale(tl.abs(h))
    q = to_e4m3_inv(h, inv_scale, HW_CAST)
    tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def norm_quantize_rows_fp8(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's pre-norm and the per-token quantizer in one kernel: ``(q, scale, s)`` with
    ``h, s = fused_add_rms_norm(x, residual, norm_weight, eps)`` (``rms_norm(x)`` and ``x``
    itself when ``residual`` is None) and ``q, scale = quantize_rows_fp8(h)``, the bits of the
    two kernels (the same fp32 arithmetic), without ``h``'s round trip through memory or the
    quantizer's launch. The caller checks :func:`graphrt.kernels.triton_gemv.norm_operands_fit`
    (``x`` 2-D, the residual of its shape, one dtype). As ``fused_add_rms_norm``, the new
    residual overwrites ``residual`` where it is contiguous and distinct from ``x``."""
    m, k = x.shape
    x = x.contiguous()
    if residual is None:
        res_out = x
    elif residual.is_contiguous() and residual.data_ptr() != x.data_ptr():
        res_out = residual
    else:
        residual = residual.contiguous()
        res_out = torch.empty_like(x)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale, res_out
    block = triton.next_power_of_2(k)
    _norm_quantize_rows_kernel[(m,)](
        x, residual if residual is not None else x, norm_weight, q, scale, res_out, k, eps,
        HAS_RES=residual is not None, BLOCK=block, USE_PDL=pdl, HW_CAST=hw_cast(x),
        num_warps=max(1, min(16, block // 256)), **launch_options(pdl),
    )  # fmt: skip
    return q, scale, res_out


def w8a8_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`w8a8_linear` can take these operands: CUDA sm_89+, bf16 activations (and
    bias), K and N multiples of 16, and a row-major weight (its transpose is then the
    column-major second operand cuBLASLt needs, with no copy)."""
    n, k = weight.shape
    return (
        x.device.type == "cuda"
        and fp8_supported(x.device)
        and x.dtype == torch.bfloat16
        and (bias is None or bias.dtype == torch.bfloat16)
        and k % 16 == 0
        and n % 16 == 0
        and weight.stride() == (k, 1)
    )


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    silu_mul: bool = False,
    pdl: bool = False,
) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` with the activations quantized per row to e4m3
    (:func:`quantize_rows_fp8`) and ``torch._scaled_mm`` on fp8 tensor cores, row-wise scales
    (``[M, 1]`` for the activations, ``[1, N]`` for the weight), output in ``x``'s dtype.
    ``silu_mul`` takes the product on ``silu_and_mul(x)``. The caller checks
    :func:`w8a8_supported`. ``pdl`` applies to the quantizer; cuBLAS launches plainly."""
    _check(x, weight, scale, silu_mul)
    xq, xs = quantize_rows_fp8(x, silu_mul=silu_mul, pdl=pdl)
    return _scaled_mm(xq, xs, weight, scale, bias, x.dtype)


def _scaled_mm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return torch._scaled_mm(
        xq,
        weight.t(),
        scale_a=xs,
        scale_b=scale.reshape(1, -1).contiguous(),
        bias=bias,
        out_dtype=out_dtype,
        use_fast_accum=False,  # fp32 accumulation throughout, as the GEMV
    )


# ---- dispatch (the Ops entries) ---------------------------------------------------------------


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """``reference.fp8_linear``'s product by the fastest path that fits (see the module
    docstring): the FP8 GEMV for few rows, W8A8 for more, else the reference."""
    if x.dim() != 2:
        out = fp8_linear(x.reshape(-1, x.shape[-1]), weight, scale, bias, pdl=pdl)
        return out.view(*x.shape[:-1], weight.shape[0])
    if fp8_supported(x.device):
        w8a8 = w8a8_supported(x, weight, bias)
        cfg = fp8_gemv_config(x.shape[0], *weight.shape, w8a8=w8a8)
        if cfg is not None:
            return fp8_gemv(x, weight, scale, bias, cfg, pdl=pdl)
        if w8a8:
            return _w8a8(x, weight, scale, bias, False, pdl)
    return reference.fp8_linear(x, weight, scale, bias)


def _w8a8(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    silu_mul: bool,
    pdl: bool,
) -> torch.Tensor:
    """W8A8 as dispatched: the GEMV's W8A8 mode within its row bound, ``_scaled_mm`` past it."""
    xq, xs = quantize_rows_fp8(x, silu_mul=silu_mul, pdl=pdl)
    return _w8a8_quantized(xq, xs, weight, scale, bias, x.dtype)


def _w8a8_quantized(
    xq: torch.Tensor,
    xs: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`_w8a8` after its quantizer: on rows already in e4m3 with their scales."""
    wcfg = fp8_w8a8_gemv_config(xq.shape[0], *weight.shape)
    if wcfg is not None:
        return _launch_gemv(xq, xs, weight, scale, bias, wcfg, False, False, out_dtype)
    return _scaled_mm(xq, xs, weight, scale, bias, out_dtype)


def _takes_w8a8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`fp8_linear` would run ``x`` through W8A8 (:func:`_w8a8`)."""
    return (
        x.dim() == 2
        and w8a8_supported(x, weight, bias)
        and fp8_gemv_config(x.shape[0], *weight.shape) is None
    )


def silu_mul_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, pdl: bool = False
) -> torch.Tensor:
    """``fp8_linear(silu_and_mul(x), weight, scale)``: the down projection on the gate/up
    output, with SiLU-and-mul applied as the one-row GEMV or the activation quantizer loads
    ``x``.

    At 2-16 rows (and to 64 where W8A8 cannot take the operands) the GEMV does not fuse it:
    each of its programs would recompute SiLU over every row's whole K (the H100 took 202 us
    for Llama-3.1-8B's down projection at 16 rows, against 42 us for the SiLU kernel's output
    through the plain GEMV; session 23, run s24c). Past 16 rows the quantizer applies it.
    """
    if x.dim() == 2 and fp8_supported(x.device):
        w8a8 = w8a8_supported(x, weight, None)
        cfg = fp8_gemv_config(x.shape[0], *weight.shape, silu_mul=True, w8a8=w8a8)
        if cfg is not None and x.shape[0] == 1:
            return fp8_gemv(x, weight, scale, None, cfg, silu_mul=True, pdl=pdl)
        if cfg is None and w8a8:
            return _w8a8(x, weight, scale, None, True, pdl)
    act = silu_and_mul(x, pdl=pdl) if x.is_cuda or _INTERPRET else reference.silu_and_mul(x)
    return fp8_linear(act, weight, scale, pdl=pdl)  # the reference where no kernel fits


def composed_add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm, then :func:`fp8_linear` on its output: ``(y, x + residual)`` (``rms_norm``
    and ``x`` itself when ``residual`` is None), the norm on its own kernel; where the product
    runs W8A8, the norm kernel also quantizes the rows (:func:`norm_quantize_rows_fp8`)."""
    if not (x.is_cuda or _INTERPRET):
        return reference.fp8_add_rms_norm_linear(x, residual, norm_weight, eps, weight, scale, bias)
    if _takes_w8a8(x, weight, bias) and norm_operands_fit(x, residual, norm_weight, bias):
        _check(x, weight, scale, False)
        xq, xs, residual = norm_quantize_rows_fp8(x, residual, norm_weight, eps, pdl=pdl)
        return _w8a8_quantized(xq, xs, weight, scale, bias, x.dtype), residual
    h, residual = pre_norm(x, residual, norm_weight, eps, pdl=pdl)
    return fp8_linear(h, weight, scale, bias, pdl=pdl), residual


def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`composed_add_rms_norm_linear` in one kernel where one row runs on the FP8 GEMV
    (:func:`graphrt.kernels.triton_gemv.norm_gemv_one_pass`: the residual add, the norm and
    the GEMV in one pass over the inputs, the norm's factor applied after the fp32 sum); the
    norm kernel and the GEMV elsewhere."""
    if fp8_supported(x.device) and norm_operands_fit(x, residual, norm_weight, bias):
        cfg = fp8_norm_gemv_config(x.shape[0], *weight.shape)
        if cfg is not None:
            _check(x, weight, scale, False)
            return norm_gemv_one_pass(
                x, residual, norm_weight, eps, weight, scale, bias, cfg, pdl=pdl
            )
    return composed_add_rms_norm_linear(x, residual, norm_weight, eps, weight, scale, bias, pdl=pdl)
