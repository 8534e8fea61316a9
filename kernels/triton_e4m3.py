"""e4m3 rounding inside Triton kernels, shared by every kernel that writes ``float8_e4m3fn``:
the W8A8 activation quantizers (:mod:`graphrt.kernels.triton_fp8`) and the FP8 KV-cache write
(:mod:`graphrt.kernels.triton_ops`). Each gives the bits torch's ``.to(torch.float8_e4m3fn)``
gives after the same clamp, on the GPU and under ``TRITON_INTERPRET=1``. Callers pass
``HW_CAST`` true for CUDA tensors (:func:`hw_cast`): there the cast rounds, under the
interpreter the kernels round by hand."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
# A row of zeros (a padding row) gets a finite scale, as in graphrt.models.fp8.quantize_fp8.
MIN_AMAX = 1e-12
# The same, for the kernels (Triton reads only constexpr globals).
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


def hw_cast(t: torch.Tensor) -> bool:
    """Whether a kernel over ``t`` may leave e4m3 rounding to the GPU's cast: true on CUDA, false
    under the interpreter (CPU tensors), whose fp32 -> e4m3 cast does not round to nearest."""
    return t.device.type == "cuda"


@triton.jit
def round_to_e4m3(y):
    # ``y`` (fp32, |y| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32, so
    # the cast that follows is exact. Done by hand because the interpreter's fp32 -> e4m3 cast
    # does not round to nearest (1.97 becomes 1.0 under TRITON_INTERPRET=1, Triton 3.9); the
    # GPU's cast (cvt.rn) would give these same bits. Adding 1.5 * 2^(e + 20) leaves 2^(e - 3),
    # e4m3's spacing in y's binade [2^e, 2^(e+1)) (2^-9 for its subnormals, below 2^-6), as the
    # sum's last bit, so fp32 addition rounds there; the subtraction is exact.
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    magic = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (y + magic) - magic
    # Keep y's sign on a zero result, as the cast would (-0.0 is e4m3's 0x80).
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def saturate_e4m3(y, HW_CAST: tl.constexpr):
    # fp32 values clamped to e4m3's range (torch's cast does not saturate) and rounded to e4m3,
    # ties to even, for the cast to float8e4nv that follows. On a GPU (HW_CAST) that cast is
    # cvt.rn.satfinite, which rounds so itself: the rounding by hand costs ~10 instructions an
    # element, most of what a quantizer that is bound by its instruction issue does.
    y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
    if HW_CAST:
        return y
    else:
        return round_to_e4m3(y)


@triton.jit
def to_e4m3(xf, scale, HW_CAST: tl.constexpr):
    # fp32 values divided by their scale (IEEE division, as torch divides), saturated and
    # rounded to e4m3 (still in fp32). The KV cache's write, as reference.quantize_kv.
    return saturate_e4m3(tl.math.div_rn(xf, scale), HW_CAST)


@triton.jit
def to_e4m3_inv(xf, inv_scale, HW_CAST: tl.constexpr):
    # The same with a multiply by the scale's reciprocal (computed once), as the activation
    # quantizers do (reference.quantize_rows_fp8; vLLM's per-token quantizer too): IEEE division
    # is ~10 instructions an element.
    return saturate_e4m3(xf * inv_scale, HW_CAST)
