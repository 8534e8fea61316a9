"""FP8 weights: e4m3 values with one fp32 scale per output channel, and the linear layer over them.

A quantized weight ``[N, K]`` is stored as ``weight`` (``float8_e4m3fn``) and ``weight_scale``
(fp32, ``[N]``), with ``w ≈ weight.float() * weight_scale[:, None]``. Every format graphrt loads
(quantized at load time, HF ``quant_method: "fp8"``, compressed-tensors ``float-quantized``) is
brought to this one layout: a per-tensor scale is repeated over the tensor's rows, which is
exact, and lets q, k and v (or gate and up) with different scales share one fused matrix.

**The GPU seam.** A model calls :func:`linear` / :func:`silu_mul_linear` for every projection.
For an :class:`Fp8Weight` these call ``ops.fp8_linear(x, weight, weight_scale, bias)`` or
``ops.fp8_silu_mul_linear(x, weight, weight_scale)`` and nothing else, so kernels plug in
through the ``Ops`` bundle (``graphrt.kernels.ops.make_ops``). The "torch" bundle (the CPU path)
uses the reference, ``graphrt.kernels.reference.fp8_linear``, which dequantizes to the
activation dtype and runs the matmul: the numerics every kernel must match. The "triton" bundle
(CUDA) uses ``graphrt.kernels.triton_fp8``: on sm_89+, an FP8 GEMV that streams the e4m3
weight and applies the row scale after its fp32 sum (up to 16 rows; the down projection at
one row with SiLU-and-mul fused), and beyond that W8A8, the activations quantized per token on
the device (in the pre-norm's kernel where one feeds the layer) and multiplied on the FP8
tensor cores (by the GEMV's W8A8 mode up to 64 rows, by ``torch._scaled_mm`` above); before
sm_89, or for shapes ``_scaled_mm`` refuses, the reference. Any kernel must keep the step
capturable: no host sync and no allocation whose size depends on values (W8A8's per-token
activation scales are computed on the device).

Only the decoder's linear layers are quantized; embeddings, the lm_head and norms stay in the
model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from graphrt.kernels.ops import Ops

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A row of zeros still gets a finite, positive scale (its values quantize to 0); without the
# floor its scale would be 0 and the division 0/0.
_MIN_AMAX = 1e-12


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3 quantization of ``w`` (``[N, K]``, any float dtype).

    Returns ``(q, scale)``: ``q`` in ``float8_e4m3fn`` and ``scale`` fp32 ``[N]`` with
    ``scale = amax(|row|) / 448``, so each row's largest value maps to e4m3's largest finite one.
    Computed in fp32 on ``w``'s device; only this one tensor is ever held in full precision.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8 takes a 2-D weight, got shape {tuple(w.shape)}")
    w32 = w.float()
    scale = w32.abs().amax(dim=1).clamp(min=_MIN_AMAX) / FP8_MAX
    # The clamp guards against a quotient rounding just past 448, which would cast to NaN.
    q = (w32 / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale[:, None]`` in ``dtype`` (the product is formed in fp32, rounded once)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


class Fp8Weight(nn.Module):
    """A quantized ``[out_features, in_features]`` weight: e4m3 values and fp32 row scales.

    Both are parameters, so ``model.parameters()`` (and the runner's ``weight_bytes``) count
    one byte per value plus four per row.
    """

    def __init__(self, out_features: int, in_features: int, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
            requires_grad=False,
        )
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False
        )

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def load_rows(self, rows: tuple[int, int] | None, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Copy quantized rows (all rows if ``rows`` is None) and their ``[n]`` scales in."""
        w, s = self.weight.data, self.weight_scale.data
        if rows is not None:
            w, s = w.narrow(0, *rows), s.narrow(0, *rows)
        w.copy_(q)
        s.copy_(scale)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, fp8_e4m3 per-channel"


def linear(
    ops: Ops, x: torch.Tensor, w: torch.Tensor | Fp8Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ w.T + bias`` for a plain or an fp8 weight; a plain weight takes ``ops.linear``
    exactly as before, so unquantized models run the very same kernels."""
    if isinstance(w, Fp8Weight):
        return ops.fp8_linear(x, w.weight, w.weight_scale, bias)
    return ops.linear(x, w, bias)


def silu_mul_linear(ops: Ops, x: torch.Tensor, w: torch.Tensor | Fp8Weight) -> torch.Tensor:
    """The down projection on the gate/up output: ``linear(silu_and_mul(x), w)``."""
    if isinstance(w, Fp8Weight):
        return ops.fp8_silu_mul_linear(x, w.weight, w.weight_scale)
    return ops.silu_mul_linear(x, w)


def add_rms_norm_linear(
    ops: Ops,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    w: torch.Tensor | Fp8Weight,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(rms_norm(x + residual)), x + residual)``; with ``residual`` None (the first
    layer) ``x`` is normed alone and becomes the residual. One kernel for a decode step's row
    where the bundle folds norms (``make_ops``' ``fuse_norms``: FP8 weights by default, plain
    ones with "on")."""
    if isinstance(w, Fp8Weight):
        return ops.fp8_add_rms_norm_linear(
            x, residual, norm_weight, eps, w.weight, w.weight_scale, bias
        )
    return ops.add_rms_norm_linear(x, residual, norm_weight, eps, w, bias)
