"""The fused elementwise ops a model calls, bundled so the implementation is chosen once.

Models receive an :class:`Ops` explicitly; nothing here is global. ``"torch"`` is the reference
(and the CPU path); ``"triton"`` uses the fused Triton kernels in :mod:`graphrt.kernels.triton_ops`,
the few-row GEMV of :mod:`graphrt.kernels.triton_gemv` (cuBLAS above it) and the two-pass argmax
of :mod:`graphrt.kernels.triton_argmax`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from graphrt.kernels import reference


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    silu_and_mul: Callable
    rope_and_store_kv: Callable
    linear: Callable
    argmax: Callable


def make_ops(impl: str) -> Ops:
    if impl == "torch":
        return Ops(
            name="torch",
            rms_norm=reference.rms_norm,
            fused_add_rms_norm=reference.fused_add_rms_norm,
            silu_and_mul=reference.silu_and_mul,
            rope_and_store_kv=reference.rope_and_store_kv,
            linear=reference.linear,
            argmax=reference.argmax,
        )
    if impl == "triton":
        mod = importlib.import_module("graphrt.kernels.triton_ops")
        gemv = importlib.import_module("graphrt.kernels.triton_gemv")
        amax = importlib.import_module("graphrt.kernels.triton_argmax")
        return Ops(
            name="triton",
            rms_norm=mod.rms_norm,
            fused_add_rms_norm=mod.fused_add_rms_norm,
            silu_and_mul=mod.silu_and_mul,
            rope_and_store_kv=mod.rope_and_store_kv,
            linear=gemv.linear,
            argmax=amax.argmax,
        )
    raise ValueError(f"unknown op implementation {impl!r}; choose 'torch' or 'triton'")
