"""The fused elementwise ops a model calls, bundled so the implementation is chosen once.

Models receive an :class:`Ops` explicitly; nothing here is global. ``"torch"`` is the reference
(and the CPU path); ``"triton"`` uses the fused Triton kernels in :mod:`graphrt.kernels.triton_ops`,
the few-row GEMV of :mod:`graphrt.kernels.triton_gemv` (cuBLAS above it), the FP8-weight
linear layers of :mod:`graphrt.kernels.triton_fp8` (FP8 GEMV, W8A8 above it), the two-pass argmax
of :mod:`graphrt.kernels.triton_argmax` (and structured outputs' token masks) and the decode
steps' zero-copy input load (with their page-table writes) and ids store of
:mod:`graphrt.kernels.triton_step_io`, optionally launched with PDL (:mod:`graphrt.kernels.pdl`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from graphrt.kernels import reference


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    # ``add_rms_norm_linear(x, residual, norm_w, eps, weight, bias) -> (y, new_residual)``: a
    # pre-norm (``rms_norm`` when ``residual`` is None) and the plain-weight projection reading
    # it; "triton" with ``fuse_norms="on"`` runs one kernel where ``linear`` would take the GEMV
    # (few rows), else the norm kernel and then ``linear``.
    add_rms_norm_linear: Callable
    silu_and_mul: Callable
    rope_and_store_kv: Callable
    linear: Callable
    silu_mul_linear: Callable
    # ``fp8_linear(x, weight_fp8, scale, bias)`` and ``fp8_silu_mul_linear(x, weight_fp8,
    # scale)`` (the down projection on the gate/up output): the seam for FP8 weights
    # (graphrt.models.fp8). "torch" dequantizes, then multiplies (kernels.reference); "triton"
    # runs an FP8 GEMV for a few rows and W8A8 for more (kernels.triton_fp8).
    fp8_linear: Callable
    fp8_silu_mul_linear: Callable
    # ``fp8_add_rms_norm_linear(x, residual, norm_w, eps, weight_fp8, scale, bias)``: as
    # ``add_rms_norm_linear`` for an FP8 weight; "triton" runs one kernel for one row
    # (triton_gemv.norm_gemv_one_pass) unless ``fuse_norms="off"``.
    fp8_add_rms_norm_linear: Callable
    # ``argmax(logits, masks=None)``: greedy ids, over the allowed tokens where structured
    # outputs' int32 bitmasks are given; ``apply_token_bitmask(logits, masks)``: the logits with
    # the forbidden tokens at -inf (the full sampler's mask).
    argmax: Callable
    apply_token_bitmask: Callable
    # Not model ops: a decode step's first and last nodes, which read its inputs (and apply its
    # page-table writes) from and write its sampled ids to a pinned ring slot
    # (kernels.triton_step_io).
    load_step_inputs: Callable
    store_step_ids: Callable
    pdl: bool = False


def make_ops(impl: str, pdl: bool = False, fuse_norms: str = "auto") -> Ops:
    """The ops of ``impl``. ``pdl`` launches the Triton kernels with programmatic dependent
    launch (:mod:`graphrt.kernels.pdl`); the caller checks the device supports it.

    ``fuse_norms`` (``EngineConfig.fuse_norms``) folds each pre-norm into the one-row GEMV that
    reads it: FP8 weights through ``triton_gemv.norm_gemv_one_pass`` (one pass, the norm's
    factor after the sum) unless "off"; plain weights through ``triton_gemv.norm_gemv`` (two
    passes, the standalone norm's rounding) only when "on". Measured on the H100 (same machine,
    one after the other): Llama-3.1-8B FP8 at batch 1, 3.150 ms a step fused against 3.225
    unfused (run s27c); Llama-3.2-1B bf16 at batch 1, 1.119 ms with the two-pass kernel against
    1.077 without (s27b; session 23's s24b: 1.094 against 1.062), whose programs each normalise
    the whole row before their columns, work the separate norm kernel does once."""
    if fuse_norms not in ("auto", "on", "off"):
        raise ValueError(f"fuse_norms must be 'auto', 'on' or 'off', got {fuse_norms!r}")
    if impl == "torch":
        if pdl:
            raise ValueError("pdl needs the 'triton' ops")
        return Ops(
            name="torch",
            rms_norm=reference.rms_norm,
            fused_add_rms_norm=reference.fused_add_rms_norm,
            add_rms_norm_linear=reference.add_rms_norm_linear,
            silu_and_mul=reference.silu_and_mul,
            rope_and_store_kv=reference.rope_and_store_kv,
            linear=reference.linear,
            silu_mul_linear=reference.silu_mul_linear,
            fp8_linear=reference.fp8_linear,
            fp8_silu_mul_linear=reference.fp8_silu_mul_linear,
            fp8_add_rms_norm_linear=reference.fp8_add_rms_norm_linear,
            argmax=reference.argmax,
            apply_token_bitmask=reference.apply_token_bitmask,
            load_step_inputs=reference.load_step_inputs,
            store_step_ids=reference.store_step_ids,
        )
    if impl == "triton":
        mod = importlib.import_module("graphrt.kernels.triton_ops")
        gemv = importlib.import_module("graphrt.kernels.triton_gemv")
        fp8 = importlib.import_module("graphrt.kernels.triton_fp8")
        amax = importlib.import_module("graphrt.kernels.triton_argmax")
        step_io = importlib.import_module("graphrt.kernels.triton_step_io")

        def bind(f: Callable) -> Callable:
            return functools.partial(f, pdl=True) if pdl else f

        return Ops(
            name="triton",
            rms_norm=bind(mod.rms_norm),
            fused_add_rms_norm=bind(mod.fused_add_rms_norm),
            add_rms_norm_linear=bind(
                gemv.add_rms_norm_linear
                if fuse_norms == "on"
                else gemv.composed_add_rms_norm_linear
            ),
            silu_and_mul=bind(mod.silu_and_mul),
            rope_and_store_kv=bind(mod.rope_and_store_kv),
            linear=bind(gemv.linear),
            silu_mul_linear=bind(gemv.silu_mul_linear),
            fp8_linear=bind(fp8.fp8_linear),
            fp8_silu_mul_linear=bind(fp8.silu_mul_linear),
            fp8_add_rms_norm_linear=bind(
                fp8.add_rms_norm_linear if fuse_norms != "off" else fp8.composed_add_rms_norm_linear
            ),
            argmax=bind(amax.argmax),
            apply_token_bitmask=bind(amax.apply_token_bitmask),
            load_step_inputs=step_io.load_step_inputs,
            store_step_ids=step_io.store_step_ids,
            pdl=pdl,
        )
    raise ValueError(f"unknown op implementation {impl!r}; choose 'torch' or 'triton'")
