"""Kernel bandwidth benchmark: each kernel's achieved GB/s beside the HBM bandwidth measured in
the same run, the torch reference and flashinfer.

    python benchmarks/kernel_bench.py [--json PATH] [--reps 7] [--sweep]

- HBM ceiling: the fastest of three 1 GiB device-to-device copies (cudaMemcpy eager, in a
  graph, a Triton kernel), bytes read + written; a read-only pass (torch.sum) for reference.
- Decode attention: batch 64, context 2k and 8k, Llama-3.1-8B heads (32 q / 8 kv, dim 128),
  page size 16, bf16, pages shuffled. Bytes = KV read + q + out.
- Fused ops at 8B shapes (hidden 4096, inter 14336): RMSNorm+residual and RMSNorm at batch
  256 (and 2048, and L2-hot), SiLU-and-mul at batch 256, rotary + KV write at 256 tokens.
- Decode at batch 8, context 8k (split-K on and off) and chunked prefill (4 x 512 new tokens
  over a 1536 prefix) for the backend choice; flashinfer's host cost per graph replay.
- Skinny GEMMs: cuBLAS against the Triton GEMV at m = 1-16 rows for every decode GEMM of
  Llama-3.1-8B and Llama-3.2-1B; greedy argmax over a 128,256 vocabulary (batch 1-256).
- Pre-norm + projection at one row (qkv and gate/up of both models): the norm kernel then the
  GEMV, against the GEMV with the norm folded in (``add_rms_norm_linear``).
- FP8 weights (``--only fp8``): the bf16 linear against the FP8 GEMV and W8A8 at those GEMMs
  (lm_head aside) for m = 1, 2, 4, 8, 16 and 64, with a summary table of each one's % of the
  HBM ceiling and FP8's speed-up; ``--sweep`` adds the FP8 GEMV's launch configs at m = 1, 16
  (``kernels/triton_fp8.py``'s config table is re-tuned from these).

Each measurement captures ``iters`` calls into one CUDA graph (no launch gaps from Python) and
times its replays with CUDA events; ``--reps`` replays give the median and the min-max spread.
Inputs smaller than the L2 cache are rotated over enough copies to exceed it, so the figures
are HBM figures, not L2 ones (except the row marked L2-hot). ``--sweep`` also times Triton
decode launch configurations and the fused norm's configs (rows per program, warps,
streaming cache hints: ``kernels/triton_ops.py``'s ``norm_config``).
``--smoke`` runs tiny shapes (on CPU under ``TRITON_INTERPRET=1``) to check the script only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

L2_DEFEAT_BYTES = 256 << 20  # rotate small inputs over more than H100's 50 MB L2


@dataclass
class Result:
    name: str
    impl: str
    bytes: int
    times_us: list[float]
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def median_us(self) -> float:
        return statistics.median(self.times_us)

    def gbps(self, t_us: float) -> float:
        return self.bytes / (t_us * 1e-6) / 1e9


class Timer:
    """Times a list of equivalent calls (rotated inputs) per call, in microseconds."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device = device
        self.reps = reps

    def __call__(
        self, fns: list[Callable[[], object]], iters: int, graph: bool = True
    ) -> list[float]:
        for f in fns:
            f()  # compile, autotune-free warm-up, allocator warm-up
        if self.device.type != "cuda":
            out = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                for i in range(iters):
                    fns[i % len(fns)]()
                out.append((time.perf_counter() - t0) / iters * 1e6)
            return out
        torch.cuda.synchronize()
        run: Callable[[], None]
        if graph:
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for f in fns:
                    f()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(g):
                for i in range(iters):
                    fns[i % len(fns)]()
            run = g.replay
        else:

            def run() -> None:
                for i in range(iters):
                    fns[i % len(fns)]()

        run()
        torch.cuda.synchronize()
        out = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3 / iters)
        return out


def _copies(nbytes: int, smoke: bool) -> int:
    return 1 if smoke else max(1, -(-L2_DEFEAT_BYTES // max(nbytes, 1)))


# ---- HBM ceiling ---------------------------------------------------------------------------------


def _copy_kernel():
    # Defined on first use so that --smoke can enable the interpreter before decoration.
    import triton
    import triton.language as tl

    from graphrt.kernels.pdl import pdl_enter

    # Triton resolves a kernel's callees in its module's globals, not in this closure.
    globals()["pdl_enter"] = pdl_enter

    @triton.jit
    def copy(src, dst, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        pdl_enter(USE_PDL)
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = off < n
        tl.store(dst + off, tl.load(src + off, mask=m), mask=m)

    return copy


def _same_bytes_copy(timer, dev, dt, label, nbytes, iters, smoke, pdl) -> list[Result]:
    """A plain copy moving the same bytes as the op in ``label``, timed the same way (inputs
    rotated out of L2, back to back in a graph, with PDL where the op has it): the practical
    ceiling for any kernel of that size, fixed per-call costs included."""
    from graphrt.kernels.pdl import launch_options

    copy = _copy_kernel()
    esz = torch.empty((), dtype=dt).element_size()
    n = nbytes // (2 * esz)
    block = 4096
    sets = [
        (torch.randn(n, device=dev, dtype=dt), torch.empty(n, device=dev, dtype=dt))
        for _ in range(_copies(nbytes, smoke))
    ]
    grid = (-(-n // block),)
    out = []
    for on in (False, True) if pdl else (False,):
        fns = [
            lambda a=a, b=b, on=on: copy[grid](
                a, b, n, BLOCK=block, USE_PDL=on, num_warps=8, **launch_options(on)
            )
            for a, b in sets
        ]
        note = "same bytes as the op, 8 KB per program" + (", PDL launches" if on else "")
        out.append(
            Result(label, "copy-pdl" if on else "copy", 2 * n * esz, timer(fns, iters), note)
        )
    return out


def bench_hbm(timer: Timer, dev: torch.device, smoke: bool) -> list[Result]:
    """Three ways to copy 1 GiB (the ceiling is the fastest) and a read-only pass."""
    n = (1 << 18) if smoke else (1 << 28)  # int32 elements: 1 GiB
    src = torch.randint(0, 1 << 30, (n,), dtype=torch.int32, device=dev)
    dst = torch.empty_like(src)
    nbytes = 2 * 4 * n
    iters = 2 if smoke else 10
    note = "bytes read + written"
    copy = _copy_kernel()
    block = 4096
    res = [
        Result("hbm copy 1 GiB", "memcpy", nbytes, timer([lambda: dst.copy_(src)], iters, False),
               note + "; eager cudaMemcpy"),
        Result("hbm copy 1 GiB", "memcpy-graph", nbytes, timer([lambda: dst.copy_(src)], iters),
               note + "; memcpy node in a graph"),
        Result("hbm copy 1 GiB", "triton", nbytes,
               timer([lambda: copy[(n // block,)](src, dst, n, BLOCK=block, num_warps=8)], iters),
               note + "; 16 KB per program"),
    ]  # fmt: skip
    f = torch.rand(n, device=dev)
    acc = torch.empty((), dtype=torch.float32, device=dev)
    read = timer([lambda: torch.sum(f, dim=0, out=acc)], iters)
    res.append(Result("hbm read 1 GiB", "torch.sum", 4 * n, read, "bytes read"))
    return res


# ---- fused ops -----------------------------------------------------------------------------------


def _norm_sweep_configs(n: int, smoke: bool = False):
    """The fused norm's launch configs to time: rows per program {1, 2, 4, 8} x warps
    {2, 4, 8, 16} x streaming hints off/on. A thread holds ``block / (32 * warps)`` values of
    a row, and with more than one row per program two rows are live (the one being stored and
    the one prefetched); configs where that exceeds 64 values are skipped (at hidden 4096,
    rows >= 2 at 2 warps: ~190 registers a thread on sm_90), which leaves 26 at hidden 4096."""
    from graphrt.kernels.triton_ops import NormConfig

    if smoke:  # the interpreter runs a config in seconds: two check the plumbing (8: a tail)
        return [NormConfig(2, 2, True), NormConfig(8, 4, False)]
    block = 1 << (n - 1).bit_length()
    return [
        NormConfig(rows, warps, evict)
        for rows in (1, 2, 4, 8)
        for warps in (2, 4, 8, 16)
        for evict in (False, True)
        if (1 if rows == 1 else 2) * block // (32 * warps) <= 64
    ]


def _compile_in_parallel(compiles: list[Callable[[], object]]) -> None:
    """Runs Triton warm-up compiles on a thread pool (Triton releases the GIL while it
    compiles), so a sweep of many configs pays about one compile's time, not one per config.
    Without Triton's async compile mode, each config compiles on its first call instead."""
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    # A config that fails to compile is left to fail again on its first call, alone.
    pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))
    try:
        with pool, AsyncCompileMode(pool, ignore_errors=True):
            for c in compiles:
                c()
    except Exception as e:  # a Triton whose warm-up API differs: compile on first call
        print(f"  parallel compile skipped: {type(e).__name__}: {e}", file=sys.stderr)


def _sweep_norm(timer, sets, w, label, nbytes, iters, pdl=False, smoke=False) -> list[Result]:
    """The fused norm kernel at every config of :func:`_norm_sweep_configs`, launched with PDL
    where the GPU has it (as a decode step launches it), and the default config without PDL
    for reference. Each note names its config (``extra["config"]`` has it as a dict)."""
    from graphrt.kernels import triton_ops

    n = w.shape[0]
    rows = sets[0][0].shape[0]
    default = triton_ops.norm_config(rows, n)
    runs = [(c, pdl) for c in _norm_sweep_configs(n, smoke)]
    if pdl:
        runs.append((default, False))
    x0, r0 = sets[0]
    if timer.device.type == "cuda":
        _compile_in_parallel(
            [
                lambda c=c, on=on: triton_ops.launch_fused_add_rms_norm(
                    x0, r0, w, x0, r0, 1e-5, c, on, warmup=True
                )
                for c, on in runs
            ]
        )
    out = []
    for cfg, on in runs:
        fns = [
            lambda x=x, r=r, c=cfg, on=on: triton_ops.fused_add_rms_norm(
                x, r, w, 1e-5, pdl=on, cfg=c
            )
            for x, r in sets
        ]
        note = f"rows/program={cfg.rows_per_program} warps={cfg.num_warps} evict={cfg.evict}"
        note += (" pdl" if on else " no-pdl") + (" (default)" if cfg == default else "")
        try:
            times = timer(fns, iters)
        except Exception as e:  # e.g. a config that does not compile
            print(f"  sweep {note}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        r = Result(label, "triton-sweep", nbytes, times, note)
        r.extra["config"] = {**asdict(cfg), "pdl": on}
        out.append(r)
    return out


def bench_ops(
    timer: Timer,
    dev: torch.device,
    smoke: bool,
    impls: dict,
    sweep: bool = False,
    pdl: bool = False,
) -> list[Result]:
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    b, h, inter = (4, 256, 512) if smoke else (256, 4096, 14336)
    esz = torch.empty((), dtype=dt).element_size()
    iters = 2 if smoke else 40
    res = []

    # RMSNorm + residual: read x and r, write normed and the new residual. "hot" reuses one
    # input set (it stays in L2, as a GEMM output just written would); the others rotate.
    w = torch.randn(h, device=dev, dtype=dt)
    for rows, hot in ((b, False), (b, True), (8 * b, False)):
        nbytes = 4 * rows * h * esz + h * esz
        n_sets = 1 if hot else _copies(nbytes, smoke)
        sets = [
            (torch.randn(rows, h, device=dev, dtype=dt), torch.randn(rows, h, device=dev, dtype=dt))
            for _ in range(n_sets)
        ]
        label = f"rmsnorm+residual b{rows} h{h}" + (" L2-hot" if hot else "")
        for name, mod in impls.items():
            fns = [lambda x=x, r=r, m=mod: m.fused_add_rms_norm(x, r, w, 1e-5) for x, r in sets]
            res.append(Result(label, name, nbytes, timer(fns, iters)))
        if pdl:
            # Back to back with PDL, as in a step: each call waits for the previous one to
            # complete before it reads, but its launch overlaps the previous call's tail.
            from graphrt.kernels import triton_ops

            fns = [
                lambda x=x, r=r: triton_ops.fused_add_rms_norm(x, r, w, 1e-5, pdl=True)
                for x, r in sets
            ]
            res.append(Result(label, "triton-pdl", nbytes, timer(fns, iters), "PDL launches"))
        if sweep and rows == b and not hot:
            res += _sweep_norm(timer, sets, w, label, nbytes, iters, pdl, smoke)
        del sets
        if rows == b and not hot:
            res += _same_bytes_copy(timer, dev, dt, label, nbytes - h * esz, iters, smoke, pdl)

    nbytes = 2 * b * h * esz + h * esz
    xs = [torch.randn(b, h, device=dev, dtype=dt) for _ in range(_copies(nbytes, smoke))]
    for name, mod in impls.items():
        fns = [lambda x=x, m=mod: m.rms_norm(x, w, 1e-5) for x in xs]
        res.append(Result(f"rmsnorm b{b} h{h}", name, nbytes, timer(fns, iters)))
    del xs

    nbytes = 3 * b * inter * esz
    xs = [torch.randn(b, 2 * inter, device=dev, dtype=dt) for _ in range(_copies(nbytes, smoke))]
    for name, mod in impls.items():
        fns = [lambda x=x, m=mod: m.silu_and_mul(x) for x in xs]
        res.append(Result(f"silu_and_mul b{b} i{inter}", name, nbytes, timer(fns, iters)))
    del xs

    hq, hkv, d = (4, 2, 32) if smoke else (32, 8, 128)
    t = b
    rows = 4 * t
    # read q, k, v and a cos/sin row; write q, k and the K and V cache rows
    nbytes = t * d * esz * (hq + 2 * hkv) + t * d * esz * (hq + 3 * hkv) + t * d * 4
    sets = []
    for _ in range(_copies(nbytes, smoke)):
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dt)
        q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
        kc = torch.randn(rows, hkv, d, device=dev, dtype=dt)
        vc = torch.randn(rows, hkv, d, device=dev, dtype=dt)
        locs = torch.randperm(rows, device=dev)[:t]
        pos = torch.randint(0, 8192, (t,), device=dev)
        sets.append((q, k, v, pos, kc, vc, locs))
    cos_sin = torch.randn(8192, d, device=dev)
    for name, mod in impls.items():
        fns = [
            lambda s=s, m=mod: m.rope_and_store_kv(
                s[0], s[1], s[2], s[3], cos_sin, s[4], s[5], s[6]
            )
            for s in sets
        ]
        res.append(Result(f"rope+store_kv t{t} {hq}/{hkv}x{d}", name, nbytes, timer(fns, iters)))
    return res


# ---- decode attention ----------------------------------------------------------------------------


@dataclass
class DecodeCase:
    batch: int
    ctx: int
    hq: int = 32
    hkv: int = 8
    dim: int = 128
    page_size: int = 16
    max_model_len: int = 131072  # Llama-3.1-8B: graphs see the full page-table width
    fp8_kv: bool = False  # an e4m3 cache (kv_cache_dtype="fp8"), scales of 1.0


def _decode_setup(case: DecodeCase, dev: torch.device, dt: torch.dtype):
    from graphrt.kernels.attention_backend import AttentionSpec, AttnInputs

    ps = case.page_size
    per_row = -(-case.ctx // ps)
    num_pages = case.batch * per_row + 1  # + the dummy page 0
    shape = (num_pages, ps, case.hkv, case.dim)
    kv_dt = torch.float8_e4m3fn if case.fp8_kv else dt
    k = torch.randn(shape, device=dev, dtype=dt).to(kv_dt)
    v = torch.randn(shape, device=dev, dtype=dt).to(kv_dt)
    width = -(-case.max_model_len // ps)
    page_rows = torch.zeros(case.batch, width, dtype=torch.int32, device=dev)
    perm = torch.randperm(num_pages - 1, device=dev).to(torch.int32) + 1
    page_rows[:, :per_row] = perm.view(case.batch, per_row)
    seq_lens = torch.full((case.batch,), case.ctx, dtype=torch.int32, device=dev)
    q = torch.randn(case.batch, case.hq, case.dim, device=dev, dtype=dt)
    spec = AttentionSpec(case.hq, case.hkv, case.dim, ps, width, case.dim**-0.5, dt, dev)
    inputs = AttnInputs(True, seq_lens, page_rows, width * ps)
    esz = torch.empty((), dtype=dt).element_size()
    kv_esz = torch.empty((), dtype=kv_dt).element_size()
    nbytes = 2 * case.batch * case.ctx * case.hkv * case.dim * kv_esz + 2 * q.numel() * esz
    return spec, k, v, q, inputs, nbytes


def _flashinfer_backend(spec, k, v):
    try:
        from graphrt.kernels.flashinfer_attention import FlashInferAttentionBackend

        return FlashInferAttentionBackend(spec, [k], [v])
    except (ImportError, ValueError) as e:
        print(f"flashinfer skipped: {e}", file=sys.stderr)
        return None


def bench_decode(
    timer: Timer,
    dev: torch.device,
    case: DecodeCase,
    sweep: bool,
    smoke: bool,
    flashinfer: bool = True,
) -> list[Result]:
    from graphrt.kernels import torch_attention as ta
    from graphrt.kernels import triton_attention as tri

    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    spec, k, v, q, inputs, nbytes = _decode_setup(case, dev, dt)
    name = f"decode b{case.batch} ctx{case.ctx} {case.hq}/{case.hkv}x{case.dim} ps{case.page_size}"
    name += " kv-fp8" if case.fp8_kv else ""
    iters = 2 if smoke else 20
    res = []
    scales = torch.ones(1, 2, device=dev) if case.fp8_kv else None

    def triton_result(cfg: tri.TritonAttentionConfig, impl: str) -> Result:
        # The graph path, as the engine runs it: static partials, splits fixed per bucket
        # from the full page-table width.
        be = tri.TritonAttentionBackend(spec, [k], [v], scales, config=cfg)
        be.init_capture_graph(case.batch)
        meta = be.prepare_for_capture(case.batch, inputs)
        times = timer([lambda: be.forward(q, 0, meta)], iters)
        note = (
            f"splits={meta.num_splits} block_n={cfg.decode_block(case.fp8_kv)} "
            f"warps={cfg.decode_warps} stages={cfg.decode_stages}"
        )
        return Result(name, impl, nbytes, times, note, {"config": asdict(cfg)})

    def say(r: Result, tag: str = "") -> None:
        # As it goes: a sweep cut short by a time limit still says what it found.
        print(f"  {name}{tag} {r.note}: {r.median_us:.2f} us", file=sys.stderr, flush=True)

    base = tri.TritonAttentionConfig()
    res.append(triton_result(base, "triton"))
    say(res[0], " default")
    if case.batch < 32:
        res.append(triton_result(replace(base, num_splits=1), "triton-1split"))
    if sweep:
        block = "decode_block_n_fp8" if case.fp8_kv else "decode_block_n"
        cfgs = [
            replace(base, **{block: bn}, decode_warps=w, decode_stages=st)
            for bn in (32, 64, 128, 256)
            for w in (4, 8)
            for st in (2, 3, 4)
        ]
        best = res[0]
        for cfg in [c for c in cfgs if c != base]:
            try:
                r = triton_result(cfg, "triton-sweep")
            except Exception as e:  # e.g. out of shared memory for a config
                print(f"  sweep {cfg}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            res.append(r)
            say(r)
            best = r if r.median_us < best.median_us else best
        best_cfg = tri.TritonAttentionConfig(**best.extra["config"])
        for splits in (1, 2, 4):
            res.append(triton_result(replace(best_cfg, num_splits=splits), "triton-sweep"))
            say(res[-1])

    be = _flashinfer_backend(spec, k, v) if flashinfer and not case.fp8_kv else None
    if be is not None:
        res.append(_flashinfer_result(be, timer, case, q, inputs, name, nbytes, iters))

    # The torch reference gathers every position up to its bound in fp32: give it the real one.
    layer_scale = None if scales is None else scales[0]
    ref_inputs = (k, v, inputs.page_rows, inputs.seq_lens, case.ctx, spec.scale, layer_scale)
    times = timer([lambda: ta.paged_decode_attention(q, *ref_inputs)], 1 if not smoke else 2)
    res.append(Result(name, "torch", nbytes, times, "reference: gathers pages, fp32"))
    return res


def _host_us(fn: Callable[[], object], n: int = 200) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _flashinfer_result(be, timer, case, q, inputs, name, nbytes, iters) -> Result:
    from graphrt.kernels.flashinfer_attention import host_page_metadata

    bs = case.batch
    be.init_capture_graph(bs)
    be.prepare_for_capture(bs, inputs)  # warm-up plan (outside any graph)
    host = inputs.seq_lens.cpu().numpy().astype(np.int64)
    slots = np.arange(bs, dtype=np.int64)
    # Host cost of a replay's metadata refresh, the part that graphs cannot hide, and its
    # parts: the numpy page metadata, flashinfer's plan() alone (the event fence excluded).
    for _ in range(20):
        be.prepare_for_replay(bs, host, slots)
    torch.cuda.synchronize()
    total = _host_us(lambda: be.prepare_for_replay(bs, host, slots))
    # Steady state: the previous plan's copies have run (the engine plans step n+1 while step
    # n runs), so the event fence returns at once.
    steady = []
    for _ in range(200):
        torch.cuda.synchronize()
        steady += _host_us(lambda: be.prepare_for_replay(bs, host, slots), 1)
    torch.cuda.synchronize()
    numpy_part = _host_us(lambda: host_page_metadata(host, case.page_size))
    plan = _host_us(lambda: be.replan(bs))  # plan() alone, without the fence
    torch.cuda.synchronize()
    be.prepare_for_replay(bs, host, slots)

    def step() -> None:
        be.forward(q, 0, be.prepare_for_capture(bs, inputs))

    # prepare_for_capture plans outside capture and only gathers pages inside it.
    times = timer([step], iters)
    med = statistics.median
    note = (
        f"graph wrapper + page gather; host per replay {med(steady):.0f} us "
        f"({med(total):.0f} back to back; plan() {med(plan):.0f}, numpy {med(numpy_part):.0f})"
    )
    extra = {
        "prepare_for_replay_us": steady,
        "prepare_for_replay_back_to_back_us": total,
        "plan_us": plan,
        "numpy_us": numpy_part,
    }
    return Result(name, "flashinfer", nbytes, times, note, extra)


# (BLOCK_M, BLOCK_N, warps, stages) for the extend kernel.
EXTEND_SWEEP = [
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2),
    (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (128, 64, 4, 3),
]  # fmt: skip


def _extend_cfg_note(cfg) -> str:
    return (
        f"block_m={cfg.extend_block_m} block_n={cfg.extend_block_n} warps={cfg.extend_warps} "
        f"stages={cfg.extend_stages}"
    )


def bench_extend(timer: Timer, dev: torch.device, smoke: bool, sweep: bool) -> list[Result]:
    """Chunked prefill: 4 sequences, 512 new tokens each over a 1536-token cached prefix."""
    from graphrt.kernels import torch_attention as ta
    from graphrt.kernels import triton_attention as tri
    from graphrt.kernels.attention_backend import AttnInputs

    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows, new, prefix = (2, 16, 16) if smoke else (4, 512, 1536)
    case = DecodeCase(rows, prefix + new, max_model_len=prefix + new)
    case = replace(case, hq=4, hkv=2, dim=32) if smoke else case
    spec, k, v, _, dinputs, _ = _decode_setup(case, dev, dt)
    seq = np.full(rows, prefix + new, dtype=np.int64)
    cu = np.arange(rows + 1, dtype=np.int64) * new
    inputs = AttnInputs(
        False, dinputs.seq_lens, dinputs.page_rows, int(seq.max()),
        cu_q=torch.from_numpy(cu).to(dev, torch.int32), max_q_len=new,
        seq_lens_host=seq, cu_q_host=cu,
    )  # fmt: skip
    q = torch.randn(rows * new, case.hq, case.dim, device=dev, dtype=dt)
    visible = rows * (new * prefix + new * (new + 1) // 2)
    flops = 4 * case.hq * case.dim * visible
    name = f"extend {rows}x{new} over {prefix} {case.hq}/{case.hkv}x{case.dim}"
    esz = torch.empty((), dtype=dt).element_size()
    nbytes = 2 * rows * (prefix + new) * case.hkv * case.dim * esz + 2 * q.numel() * esz
    iters = 2 if smoke else 10

    def result(impl: str, fn: Callable[[], object]) -> Result:
        times = timer([fn], iters, graph=False)
        tflops = flops / (statistics.median(times) * 1e-6) / 1e12
        return Result(name, impl, nbytes, times, f"{tflops:.0f} TFLOP/s (causal FLOPs)")

    be = tri.TritonAttentionBackend(spec, [k], [v])
    meta = be.prepare_metadata(inputs)
    res = [result("triton", lambda: be.forward(q, 0, meta))]
    res[-1].note += f" {_extend_cfg_note(be.config)}"
    if sweep:
        args = (k, v, inputs.page_rows, seq.tolist(), cu.tolist(), spec.scale)
        ref = ta.paged_extend_attention(q, *args).float()
        base = be.config
        for bm, bn, warps, stages in EXTEND_SWEEP:
            cfg = replace(base, extend_block_m=bm, extend_block_n=bn, extend_warps=warps,
                          extend_stages=stages)  # fmt: skip
            if cfg == base:
                continue
            sb = tri.TritonAttentionBackend(spec, [k], [v], config=cfg)
            try:
                err = (sb.forward(q, 0, meta) - ref).abs().max().item()
                r = result("triton-sweep", lambda sb=sb: sb.forward(q, 0, meta))
            except Exception as e:  # e.g. out of shared memory for a config
                print(f"  sweep {cfg}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            r.note += f" {_extend_cfg_note(cfg)} max|err|={err:.1e}"
            r.extra["config"] = asdict(cfg)
            res.append(r)
    fi = _flashinfer_backend(spec, k, v)
    if fi is not None:
        fmeta = fi.prepare_metadata(inputs)
        res.append(result("flashinfer", lambda: fi.forward(q, 0, fmeta)))
    args = (k, v, inputs.page_rows, seq.tolist(), cu.tolist(), spec.scale)
    res.append(result("torch", lambda: ta.paged_extend_attention(q, *args)))
    return res


# ---- skinny GEMMs and the greedy argmax ----------------------------------------------------------

# (model, layer, N, K) of Llama-3.1-8B and Llama-3.2-1B's decode GEMMs (q/k/v and gate/up fused).
GEMV_SHAPES = [
    ("8b", "qkv", 6144, 4096),
    ("8b", "o", 4096, 4096),
    ("8b", "gate_up", 28672, 4096),
    ("8b", "down", 4096, 14336),
    ("8b", "lm_head", 128256, 4096),
    ("1b", "qkv", 3072, 2048),
    ("1b", "o", 2048, 2048),
    ("1b", "gate_up", 16384, 2048),
    ("1b", "down", 2048, 8192),
    ("1b", "lm_head", 128256, 2048),
]


def _gemv_sweep_configs(m: int, smoke: bool = False):
    from graphrt.kernels.triton_gemv import GemvConfig

    if smoke:  # the interpreter runs a config in seconds: two check the plumbing
        return [GemvConfig(2, 32, 2, 4), GemvConfig(16, 64, 4, 4)][: 2 if m == 1 else 1]
    if m == 1:
        return [
            GemvConfig(bn, bk, w, st)
            for bn in (2, 4, 8, 16)
            for bk in (256, 512, 1024)
            for w, st in ((2, 4), (4, 4), (8, 4))
        ]
    return [GemvConfig(bn, bk, w, 4) for bn in (16, 32) for bk in (128, 256) for w in (4, 8)]


def bench_gemv(
    timer: Timer,
    dev: torch.device,
    smoke: bool,
    sweep: bool,
    pdl: bool = False,
    only_shapes: list[str] | None = None,
    rows: list[int] | None = None,
) -> list[Result]:
    """cuBLAS (``F.linear``) against the GEMV kernel at decode's few-row shapes; bytes = weight +
    input + output. ``pdl`` adds the GEMV launched with PDL, back to back as in a step (its first
    weight block loads while the previous call finishes). With ``--sweep``, every launch config
    at m = 1 and 8."""
    import torch.nn.functional as F

    from graphrt.kernels import triton_gemv as tg

    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = [("tiny", "down", 512, 64)] if smoke else GEMV_SHAPES
    if only_shapes:
        shapes = [s for s in shapes if f"{s[0]}:{s[1]}" in only_shapes]
    ms = (1, 2) if smoke else (1, 2, 4, 8, 16) if sweep else (1, 8)
    if rows:
        ms = tuple(rows)
    iters = 2 if smoke else 20
    res = []
    for model, layer, n, k in shapes:
        wbytes = n * k * 2
        ws = [
            torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(_copies(wbytes, smoke))
        ]
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dt)
            nbytes = wbytes + 2 * m * (n + k)
            label = f"linear {model} {layer} m{m} {n}x{k}"
            fns = [lambda w=w, x=x: F.linear(x, w) for w in ws]
            res.append(Result(label, "cublas", nbytes, timer(fns, iters)))
            cfg = tg.gemv_config(m, n, k)
            if cfg is not None:
                fns = [lambda w=w, x=x, c=cfg: tg.gemv(x, w, None, c) for w in ws]
                res.append(Result(label, "triton", nbytes, timer(fns, iters), str(cfg)))
                if pdl:
                    fns = [lambda w=w, x=x, c=cfg: tg.gemv(x, w, None, c, pdl=True) for w in ws]
                    res.append(Result(label, "triton-pdl", nbytes, timer(fns, iters), str(cfg)))
            if layer == "down" and m == 1:
                res += _bench_down_silu(timer, ws, m, n, k, iters, pdl)
            if (layer in ("qkv", "gate_up") or smoke) and m == 1:
                res += _bench_norm_linear(timer, ws, model, layer, m, iters, pdl, sweep, smoke)
            if sweep and m in (1, 8):
                # Launched as a step launches them: with PDL where the GPU has it.
                gu = torch.randn(m, 2 * k, device=dev, dtype=dt)
                fused = layer == "down" and m == 1
                for c in _gemv_sweep_configs(m, smoke):
                    fns = [lambda w=w, x=x, c=c: tg.gemv(x, w, None, c, pdl=pdl) for w in ws]
                    r = Result(label, "triton-sweep", nbytes, timer(fns, iters), str(c))
                    r.extra["config"] = asdict(c)
                    res.append(r)
                    if fused:
                        fns = [
                            lambda w=w, c=c, gu=gu: tg.gemv(gu, w, None, c, silu_mul=True, pdl=pdl)
                            for w in ws
                        ]
                        r = Result(f"silu+down m{m} {n}x{k}", "triton-sweep",
                                   nbytes + 2 * m * k, timer(fns, iters), str(c))  # fmt: skip
                        r.extra["config"] = asdict(c)
                        res.append(r)
        del ws
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _bench_down_silu(timer, ws, m, n, k, iters, pdl) -> list[Result]:
    """The down projection on the gate/up output: SiLU-and-mul then cuBLAS (two kernels, plus
    cuBLAS's split-K reduction) against the GEMV that applies SiLU as it loads its input. Bytes
    = weight + gate/up input + output, as the fused kernel reads them."""
    import torch.nn.functional as F

    from graphrt.kernels import triton_gemv as tg
    from graphrt.kernels import triton_ops

    gu = torch.randn(m, 2 * k, device=ws[0].device, dtype=ws[0].dtype)
    nbytes = n * k * 2 + 2 * m * (n + 2 * k)
    label = f"silu+down m{m} {n}x{k}"
    res = []
    fns = [lambda w=w: F.linear(triton_ops.silu_and_mul(gu), w) for w in ws]
    res.append(Result(label, "silu+cublas", nbytes, timer(fns, iters), "two kernels"))
    cfg = tg.gemv_config(m, n, k, silu_mul=True)
    if cfg is not None:
        for on in (False, True) if pdl else (False,):
            fns = [lambda w=w, on=on: tg.gemv(gu, w, None, cfg, silu_mul=True, pdl=on) for w in ws]
            impl = "triton-silu-pdl" if on else "triton-silu"
            res.append(Result(label, impl, nbytes, timer(fns, iters), str(cfg)))
    return res


def _bench_norm_linear(timer, ws, model, layer, m, iters, pdl, sweep, smoke) -> list[Result]:
    """A decoder layer's pre-norm (residual add included) and the projection reading it: the
    norm kernel then the GEMV (what a step ran before ``add_rms_norm_linear``; both with the
    same GEMV config), against the one kernel that does both. Bytes, the same for both rows:
    weight + x and residual read + norm weight + output and new residual written, the traffic
    the fused kernel cannot avoid (the unfused pair also writes and rereads the normed row).
    With ``--sweep``, the fused kernel at every GEMV config: its programs also read the
    activations twice (sum of squares, then the normed values), which may favour wider ones."""
    from graphrt.kernels import triton_gemv as tg
    from graphrt.kernels import triton_ops

    n, k = ws[0].shape
    dev, dt = ws[0].device, ws[0].dtype
    x = torch.randn(m, k, device=dev, dtype=dt)
    resid = torch.randn(m, k, device=dev, dtype=dt)
    nw = (1 + 0.1 * torch.randn(k, device=dev)).to(dt)
    esz = ws[0].element_size()
    nbytes = n * k * esz + esz * (3 * m * k + k + m * n)
    label = f"norm+{layer} {model} m{m} {n}x{k}"
    cfg = tg.norm_gemv_config(x, resid, nw, ws[0], None)
    if cfg is None:
        return []

    def unfused(w, on):
        h, _ = triton_ops.fused_add_rms_norm(x, resid, nw, 1e-5, pdl=on)  # in place, as a step
        return tg.gemv(h, w, None, cfg, pdl=on)

    def fused(w, c, on):
        return tg.norm_gemv(x, resid, nw, 1e-5, w, None, c, pdl=on)

    def one_pass(w, c, on):
        return tg.norm_gemv_one_pass(x, resid, nw, 1e-5, w, None, None, c, pdl=on)

    res = []
    for on in (False, True) if pdl else (False,):
        sfx = "-pdl" if on else ""
        fns = [lambda w=w, on=on: unfused(w, on) for w in ws]
        res.append(Result(label, "norm+triton" + sfx, nbytes, timer(fns, iters), "two kernels"))
        fns = [lambda w=w, on=on: fused(w, cfg, on) for w in ws]
        res.append(Result(label, "triton-norm" + sfx, nbytes, timer(fns, iters), str(cfg)))
        if m == 1:  # the one-pass kernel (the norm's factor after the sum; not bit-equal)
            fns = [lambda w=w, on=on: one_pass(w, cfg, on) for w in ws]
            res.append(Result(label, "one-pass" + sfx, nbytes, timer(fns, iters), str(cfg)))
    if sweep:
        # Interpreted (--smoke), narrow programs take seconds a call: one wide config checks it.
        for c in _gemv_sweep_configs(m, smoke)[-1 if smoke else 0 :]:
            kinds = [("", fused)] + ([("one pass ", one_pass)] if m == 1 else [])
            for tag, fn in kinds:
                fns = [lambda w=w, c=c, fn=fn: fn(w, c, pdl) for w in ws]
                r = Result(label, "triton-sweep", nbytes, timer(fns, iters), f"{tag}{c}")
                r.extra["config"] = asdict(c) | ({"one_pass": True} if tag else {})
                res.append(r)
    return res


def _bench_fp8_norm_linear(timer, qs, model, layer, x, iters, pdl, sweep, smoke) -> list[Result]:
    """The pre-norm (residual add included) and the FP8 projection reading it, one row: the
    norm kernel then the FP8 GEMV (a step's default), against the one-pass kernel a step runs
    with ``fuse_norms`` (``triton_fp8.add_rms_norm_linear``). Bytes, the same for both rows:
    FP8 weight and row scales + x, residual and norm weight read + output and new residual
    written. With ``--sweep``, the one-pass kernel at every one-row config: each program also
    reads the residual and the norm weight, which may favour wider column blocks."""
    from graphrt.kernels import triton_fp8 as tf
    from graphrt.kernels import triton_gemv as tg
    from graphrt.kernels import triton_ops

    n, k = qs[0][0].shape
    resid = torch.randn_like(x)
    nw = (1 + 0.1 * torch.randn(k, device=x.device)).to(x.dtype)
    nbytes = n * k + 4 * n + x.element_size() * (4 * k + n)
    label = f"fp8 norm+{layer} {model} m1 {n}x{k}"

    def unfused(q, s):
        h, _ = triton_ops.fused_add_rms_norm(x, resid, nw, 1e-5, pdl=pdl)  # in place, as a step
        return tf.fp8_linear(h, q, s, pdl=pdl)

    fns = [lambda q=q, s=s: unfused(q, s) for q, s in qs]
    res = [Result(label, "norm+fp8", nbytes, timer(fns, iters), "two kernels")]
    fns = [
        lambda q=q, s=s: tf.add_rms_norm_linear(x, resid, nw, 1e-5, q, s, pdl=pdl) for q, s in qs
    ]
    cfg = tf.fp8_norm_gemv_config(1, n, k)
    res.append(Result(label, "fp8-norm", nbytes, timer(fns, iters), f"one pass {cfg}"))
    if sweep:
        for c in _fp8_sweep_configs(1, smoke):
            fns = [
                lambda q=q, s=s, c=c: tg.norm_gemv_one_pass(
                    x, resid, nw, 1e-5, q, s, None, c, pdl=pdl
                )
                for q, s in qs
            ]
            if (us := _time_if_it_fits(timer, fns, iters)) is None:
                continue
            r = Result(label, "triton-sweep", nbytes, us, f"one pass {c}")
            r.extra["config"] = asdict(c) | {"one_pass": True}
            res.append(r)
    return res


def bench_argmax(timer: Timer, dev: torch.device, smoke: bool) -> list[Result]:
    """Greedy sampling over a 128,256 vocabulary: the old path (fp32 copy of the bf16 logits, then
    ``torch.argmax``) against the two-pass Triton argmax on the bf16 logits. Bytes = logits read
    once (the kernel's own traffic; the old path moves 3x that)."""
    from graphrt.kernels import triton_argmax

    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    vocab = 5000 if smoke else 128256
    res = []
    for b in (1, 2) if smoke else (1, 8, 64, 256):
        nbytes = b * vocab * 2
        xs = [torch.randn(b, vocab, device=dev, dtype=dt) for _ in range(_copies(nbytes, smoke))]
        label = f"argmax b{b} v{vocab}"
        fns = [lambda x=x: x.float().argmax(dim=-1) for x in xs]
        res.append(Result(label, "torch", nbytes, timer(fns, 20), "fp32 copy + torch.argmax"))
        fns = [lambda x=x: triton_argmax.argmax(x) for x in xs]
        res.append(Result(label, "triton", nbytes, timer(fns, 20)))
    return res


# ---- FP8 weights (issue #21) --------------------------------------------------------------------

FP8_ROWS = (1, 2, 4, 8, 16, 64)


def _fp8_sweep_configs(m: int, smoke: bool = False):
    from graphrt.kernels.triton_gemv import GemvConfig

    if smoke:
        if m == 1:
            return [GemvConfig(2, 32, 2, 4), GemvConfig(16, 64, 4, 4)]
        return [GemvConfig(2, 32, 2, 4), GemvConfig(16, 32, 4, 2, split_k=2, swap_ab=True)]
    if m == 1:
        return [
            GemvConfig(bn, bk, w, 4)
            for bn in (2, 4, 8, 16)
            for bk in (512, 1024, 2048)
            for w in (4, 8)
        ]
    if m > 16:  # short K blocks (an [m, block_k] tile per stage must fit), wide N, split K
        return [
            GemvConfig(bn, bk, 4, 3, split_k=sk, swap_ab=swap)
            for bn in (64, 128)
            for bk in (64, 128)
            for sk in (1, 2, 4)
            for swap in (False, True)
        ]
    # 2-16 rows: each program also reads its rows of x for every K block, as many bytes as its
    # weight tile at 16 columns; wider column blocks, split K and the weight as the dot's first
    # operand are the candidates (s24c's FEW_ROWS reached about half of HBM).
    return [
        GemvConfig(bn, bk, 4, 3, split_k=sk, swap_ab=swap)
        for bn in (16, 64, 128)
        for bk in (128, 256)
        for sk in (1, 2)
        for swap in ((False, True) if bn >= 64 else (False,))
    ]


def _w8a8_sweep_configs(m: int, smoke: bool = False):
    """Configs for the GEMV's W8A8 mode past 16 rows, where ``_scaled_mm`` runs the wide
    layers (s25b: Llama-3.1-8B's gate/up at 64 rows in 53.9 us, 74% of HBM)."""
    from graphrt.kernels.triton_gemv import GemvConfig

    if m <= 16:
        return []
    if smoke:
        return [GemvConfig(16, 32, 4, 2, split_k=2, swap_ab=True)]
    # Session 28: every layer at 17-64 rows takes this mode. s29a swept wide blocks and split
    # K to 8 (the first set): the narrow layers were fastest on 64-column blocks, 256-long K
    # blocks and four stages, without split K. The second set goes the other way: narrower
    # column blocks (more programs without a split; the weight as the dot's second operand
    # too), longer K blocks and deeper pipelines, within shared memory at 64 rows.
    first = [
        GemvConfig(bn, bk, w, st, split_k=sk, swap_ab=True)
        for bn in (64, 128, 256)
        for bk in (128, 256)
        for sk in (1, 2, 4, 8)
        for w, st in ((4, 3), (4, 4), (8, 3))
        if bn * bk * st <= 3 * 128 * 256
    ]
    second = [
        GemvConfig(bn, bk, w, st, split_k=sk, swap_ab=swap)
        for bn in (16, 32, 64, 128)
        for bk in (256, 512)
        for sk in (1, 2)
        for w, st in ((4, 4), (4, 5), (8, 4))
        for swap in (True, False)
        if (bn + 64) * bk * st <= 224 * 1024
    ]
    return first + [c for c in second if c not in first]


def _fp8_gemv_cfg(m: int, n: int, k: int):
    """The dispatch's config, or where it takes W8A8 the GEMV's many-row one (short K blocks:
    a 64-row tile of 512 would overflow shared memory), so the table shows where the GEMV stops
    paying."""
    from graphrt.kernels import triton_fp8 as tf

    return tf.fp8_gemv_config(m, n, k, w8a8=False) or replace(
        tf.MANY_ROWS, block_k=min(128, 1 << (k.bit_length() - 1))
    )


def bench_fp8(
    timer: Timer,
    dev: torch.device,
    smoke: bool,
    sweep: bool,
    pdl: bool = False,
    only_shapes: list[str] | None = None,
    rows: list[int] | None = None,
) -> list[Result]:
    """FP8 weights against bf16 at Llama-3.1-8B's and Llama-3.2-1B's decoder GEMMs (the lm_head
    stays bf16): the bf16 linear a step runs today (``triton_gemv.linear``: its GEMV or cuBLAS),
    the FP8 GEMV and W8A8 (per-token quantizer + ``torch._scaled_mm``; sm_89+), each at every
    row count whatever ``fp8_linear``'s row bound picks, so the bound can be set from the table.
    The down projection also runs from the gate/up output (SiLU fused) on both paths. Bytes = the
    weight (2 bytes a value in bf16; 1 plus a 4-byte scale per row in FP8) + bf16 input + output:
    each op's unavoidable traffic. With ``--sweep``, every FP8 GEMV candidate config at each
    row count (``_fp8_sweep_configs``: one row, 2-16, more)."""
    from graphrt.kernels import triton_fp8 as tf
    from graphrt.kernels import triton_gemv as tg
    from graphrt.models.fp8 import quantize_fp8

    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = [("tiny", "down", 128, 64)] if smoke else [s for s in GEMV_SHAPES if s[1] != "lm_head"]
    if only_shapes:
        shapes = [s for s in shapes if f"{s[0]}:{s[1]}" in only_shapes]
    ms = tuple(rows) if rows else (1, 2, 65) if smoke else FP8_ROWS
    iters = 2 if smoke else 20
    res = []
    for model, layer, n, k in shapes:
        ws = [
            torch.randn(n, k, device=dev, dtype=dt) / k**0.5
            for _ in range(_copies(2 * n * k, smoke))
        ]
        qs = [quantize_fp8(ws[i % len(ws)]) for i in range(_copies(n * k, smoke))]
        fp8_bytes = n * k + 4 * n
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dt)
            gu = torch.randn(m, 2 * k, device=dev, dtype=dt)
            io = 2 * m * (n + k)
            label = f"fp8 {model} {layer} m{m} {n}x{k}"
            fns = [lambda w=w, x=x: tg.linear(x, w, pdl=pdl) for w in ws]
            cfg = tg.gemv_config(m, n, k)
            res.append(Result(label, "bf16", 2 * n * k + io, timer(fns, iters),
                              f"GEMV {cfg}" if cfg else "cuBLAS"))  # fmt: skip
            cfg = _fp8_gemv_cfg(m, n, k)
            fns = [
                lambda q=q, s=s, x=x, c=cfg: tf.fp8_gemv(x, q, s, None, c, pdl=pdl) for q, s in qs
            ]
            past = tf.fp8_gemv_config(m, n, k) is None  # the dispatch takes W8A8 here
            note = str(cfg) + ("; past the row bound" if past else "")
            res.append(Result(label, "triton-fp8", fp8_bytes + io, timer(fns, iters), note))
            if (wcfg := tf.fp8_w8a8_gemv_config(m, n, k)) is not None:
                fns = [
                    lambda q=q, s=s, x=x: tf.fp8_w8a8_gemv(x, q, s, None, wcfg, pdl=pdl)
                    for q, s in qs
                ]
                note = f"quantizer + the GEMV's W8A8 mode (dispatched), {wcfg}"
                res.append(Result(label, "w8a8-gemv", fp8_bytes + io, timer(fns, iters), note))
            if tf.w8a8_supported(x, qs[0][0], None):
                fns = [lambda q=q, s=s, x=x: tf.w8a8_linear(x, q, s, pdl=pdl) for q, s in qs]
                res.append(Result(label, "w8a8", fp8_bytes + io, timer(fns, iters),
                                  "quantizer + _scaled_mm"))  # fmt: skip
            if (layer in ("qkv", "gate_up") or smoke) and m == 1:
                res += _bench_fp8_norm_linear(timer, qs, model, layer, x, iters, pdl, sweep, smoke)
            if layer == "down":
                label = f"fp8 silu+{layer} {model} m{m} {n}x{k}"
                io = 2 * m * (n + 2 * k)
                fns = [lambda w=w, gu=gu: tg.silu_mul_linear(gu, w, pdl=pdl) for w in ws]
                res.append(Result(label, "bf16", 2 * n * k + io, timer(fns, iters)))
                fns = [lambda q=q, s=s, gu=gu: tf.silu_mul_linear(gu, q, s, pdl=pdl) for q, s in qs]
                res.append(Result(label, "fp8", fp8_bytes + io, timer(fns, iters),
                                  "fp8_silu_mul_linear's dispatch"))  # fmt: skip
            if sweep:
                label = f"fp8 {model} {layer} m{m} {n}x{k}"
                # The GEMV's configs, then its W8A8 mode's (on e4m3 rows, past 16 rows), and at
                # one row the down projection with SiLU-and-mul on load: each program recomputes
                # SiLU over all of K, so its best config need not be the plain GEMV's (s26d:
                # 24.8 us against 21.2 at the same config).
                silu = f"fp8 silu+{layer} {model} m{m} {n}x{k}"
                fused = functools.partial(tf.fp8_gemv, silu_mul=True)
                cands = [(label, tf.fp8_gemv, x, c, "") for c in _fp8_sweep_configs(m, smoke)]
                w8a8_cfgs = _w8a8_sweep_configs(m, smoke)
                cands += [(label, tf.fp8_w8a8_gemv, x, c, "w8a8") for c in w8a8_cfgs]
                if dev.type == "cuda":
                    _compile_in_parallel(
                        [
                            lambda c=c, m=m, w=qs[0][0]: tf.warm_up_w8a8_gemv(m, w, c)
                            for c in w8a8_cfgs
                        ]
                    )
                if layer == "down" and m == 1:
                    cands += [
                        (silu, fused, gu, c, "silu_mul") for c in _fp8_sweep_configs(m, smoke)
                    ]
                for name, fn, inp, c, tag in cands:
                    fns = [
                        lambda q=q, s=s, inp=inp, c=c, fn=fn: fn(inp, q, s, None, c, pdl=pdl)
                        for q, s in qs
                    ]
                    if (us := _time_if_it_fits(timer, fns, iters)) is None:
                        continue
                    nbytes = fp8_bytes + 2 * m * (n + inp.shape[1])
                    r = Result(name, "triton-sweep", nbytes, us, f"{tag} {c}".lstrip())
                    r.extra["config"] = asdict(c) | ({tag: True} if tag else {})
                    res.append(r)
        del ws, qs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _time_if_it_fits(timer: Timer, fns, iters: int) -> float | None:
    """``timer(fns, iters)``, or None where Triton cannot fit the config's tile
    (``OutOfResources``: shared memory or registers) or cannot compile it
    (``CompilationError``: a sweep candidate outside what this Triton lowers for the GPU; named
    on stderr, and the sweep goes on). Any other error is a bug and raises."""
    try:
        return timer(fns, iters)
    except Exception as e:
        name = type(e).__name__
        if name not in ("OutOfResources", "CompilationError"):
            raise
        if name == "CompilationError":
            print(f"  sweep candidate skipped: {name}: {e}"[:300], file=sys.stderr)
        return None


def _fp8_table(results: list[Result], hbm_gbps: float) -> str:
    """One line per FP8 shape and row count: each path's time, achieved GB/s and % of the HBM
    ceiling measured in the same run, and the fastest FP8 path's speed-up over bf16."""
    names = [r.name for r in results if r.name.startswith("fp8 ") and r.impl == "bf16"]
    out = [
        f"fp8 vs bf16 (median us, GB/s, % of the {hbm_gbps:.0f} GB/s HBM ceiling; "
        "w8a8 only on sm_89+):",
        f"  {'shape':<40} {'bf16':>21} {'fp8 gemv*':>21} {'w8a8**':>21} {'speed-up':>9}",
    ]
    for name in names:
        by = {r.impl: r for r in results if r.name == name and r.impl != "triton-sweep"}

        def cell(impl: str, by=by) -> str:
            r = by.get(impl)
            if r is None:
                return f"{'-':>21}"
            gb = r.gbps(r.median_us)
            return f"{r.median_us:>8.2f} {gb:>5.0f} {100 * gb / hbm_gbps:>5.1f}%"

        fp8 = [by[i].median_us for i in ("triton-fp8", "w8a8", "w8a8-gemv", "fp8") if i in by]
        speed = by["bf16"].median_us / min(fp8) if fp8 else float("nan")
        gemv = "fp8" if "fp8" in by else "triton-fp8"
        w8a8 = "w8a8-gemv" if "w8a8-gemv" in by else "w8a8"
        out.append(
            f"  {name.removeprefix('fp8 '):<40} {cell('bf16')} {cell(gemv)} {cell(w8a8)} "
            f"{speed:>8.2f}x"
        )
    out.append("  * silu+down rows: fp8_silu_mul_linear as dispatched (GEMV up to its row bound)")
    out.append("  ** the GEMV's W8A8 mode where dispatched (17-64 rows), else _scaled_mm")
    return "\n".join(out)


# ---- driver --------------------------------------------------------------------------------------


def _table(results: list[Result], hbm_gbps: float, device: str) -> str:
    lines = [
        f"device: {device}; HBM ceiling (fastest 1 GiB D2D copy, read+write): {hbm_gbps:.0f} GB/s",
        f"{'kernel':<40} {'impl':<12} {'median us':>10} {'min-max us':>17} {'GB/s':>7} "
        f"{'% HBM':>6}  note",
    ]
    for r in results:
        if r.impl == "triton-sweep":
            continue
        lo, hi = min(r.times_us), max(r.times_us)
        gb = r.gbps(r.median_us)
        lines.append(
            f"{r.name:<40} {r.impl:<12} {r.median_us:>10.2f} {lo:>8.2f}-{hi:<8.2f} {gb:>7.0f} "
            f"{100 * gb / hbm_gbps:>5.1f}%  {r.note}"
        )
    return "\n".join(lines)


def _sweep_table(results: list[Result], hbm_gbps: float, top: int = 6) -> str:
    """Per kernel: the ``top`` fastest sweep configs and the default (every one is in the JSON)."""
    names = {r.name for r in results if r.impl == "triton-sweep"}
    rows = []
    for name in sorted(names):
        mine = [r for r in results if r.name == name]
        sweep = sorted((r for r in mine if r.impl == "triton-sweep"), key=lambda r: r.median_us)
        defaults = [r for r in mine if r.impl.startswith("triton") and r.impl != "triton-sweep"]
        rows += sweep[:top] + defaults
    out = [
        f"triton sweep (median us, % of the {hbm_gbps:.0f} GB/s HBM ceiling; the {top} fastest "
        "configs, then the defaults):"
    ]
    for r in rows:
        out.append(
            f"  {r.name:<40} {r.impl:<16} {r.median_us:>9.2f} "
            f"{100 * r.gbps(r.median_us) / hbm_gbps:>5.1f}%  {r.note}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", help="write all results (every repetition) to this path")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (>= 5)")
    ap.add_argument("--sweep", action="store_true", help="also sweep Triton launch configs")
    ap.add_argument(
        "--no-decode-sweep", action="store_true", help="with --sweep: extend and norm only"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script only")
    ap.add_argument(
        "--no-pdl", action="store_true", help="skip the rows launched with PDL (sm_90+ only)"
    )
    ap.add_argument(
        "--gemv-shapes",
        nargs="+",
        metavar="MODEL:LAYER",
        help="GEMV shapes to run, e.g. 1b:qkv 1b:down (default: all)",
    )
    ap.add_argument(
        "--gemv-rows",
        type=int,
        nargs="+",
        help="GEMV row counts (default: 1 8; fp8 section: 1 2 4 8 16 64)",
    )
    ap.add_argument("--skip-ops", action="store_true", help="attention only")
    ap.add_argument(
        "--decode-cases",
        type=lambda t: tuple(int(x) for x in t.split("x")),
        nargs="+",
        default=None,
        metavar="BATCHxCTX",
        help="decode cases instead of the defaults (64x2048 64x8192 8x8192), e.g. 64x256",
    )
    ap.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8"],
        default="auto",
        help="with --decode-cases: 'fp8' times the decode kernel over an e4m3 cache",
    )
    ap.add_argument(
        "--no-flashinfer",
        action="store_true",
        help="leave out the flashinfer decode rows (its first use compiles for ~23 s)",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["decode", "extend", "ops", "gemv", "argmax", "fp8"],
        help="run only these sections (the HBM ceiling always runs)",
    )
    args = ap.parse_args(argv)
    if args.reps < 5 and not args.smoke:
        ap.error("--reps must be at least 5")
    if not torch.cuda.is_available():
        if not args.smoke:
            sys.exit("benchmarks/kernel_bench.py needs a CUDA device (or --smoke)")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()

    from graphrt.kernels import reference, triton_ops
    from graphrt.kernels.pdl import pdl_supported

    pdl = pdl_supported(dev) and not args.no_pdl
    timer = Timer(dev, args.reps)
    results = bench_hbm(timer, dev, args.smoke)
    # The ceiling: the fastest copy, bytes read + written (DESIGN.md's definition).
    hbm_gbps = max(r.gbps(r.median_us) for r in results if r.name.startswith("hbm copy"))
    if args.smoke:
        cases = [(DecodeCase(2, 64, 4, 2, 32, 16, 256), True)]
    else:
        dsweep = args.sweep and not args.no_decode_sweep
        if args.decode_cases:
            fp8 = args.kv_cache_dtype == "fp8"
            cases = [(DecodeCase(b, c, fp8_kv=fp8), dsweep) for b, c in args.decode_cases]
        else:
            cases = [(DecodeCase(64, 2048), dsweep), (DecodeCase(64, 8192), dsweep)]
            cases.append((DecodeCase(8, 8192), False))
    # A failing section is reported and skipped, so the others still give their figures.
    sections = [
        (
            "decode",
            lambda c=c, sw=sw: bench_decode(timer, dev, c, sw, args.smoke, not args.no_flashinfer),
        )
        for c, sw in cases
    ]
    sections.append(("extend", lambda: bench_extend(timer, dev, args.smoke, args.sweep)))
    if not args.skip_ops:
        impls = {"triton": triton_ops, "torch": reference}
        sections.append(("ops", lambda: bench_ops(timer, dev, args.smoke, impls, args.sweep, pdl)))
        sections.append(
            (
                "gemv",
                lambda: bench_gemv(
                    timer, dev, args.smoke, args.sweep, pdl, args.gemv_shapes, args.gemv_rows
                ),
            )
        )
        sections.append(("argmax", lambda: bench_argmax(timer, dev, args.smoke)))
        sections.append(
            (
                "fp8",
                lambda: bench_fp8(
                    timer, dev, args.smoke, args.sweep, pdl, args.gemv_shapes, args.gemv_rows
                ),
            )
        )
    for name, section in sections:
        if args.only and name not in args.only:
            continue
        try:
            results += section()
        except Exception as e:
            print(f"benchmark section failed: {type(e).__name__}: {e}", file=sys.stderr)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if args.sweep:
        print(_sweep_table(results, hbm_gbps))
    print(_table(results, hbm_gbps, device))
    if any(r.name.startswith("fp8 ") for r in results):
        print(_fp8_table(results, hbm_gbps))
    if args.json:
        meta = {
            "device": device,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "hbm_gbps": hbm_gbps,
            "reps": args.reps,
        }
        try:
            import flashinfer

            meta["flashinfer"] = flashinfer.__version__
        except ImportError:
            pass
        rows = []
        for r in results:
            d = asdict(r)
            d.update(
                median_us=r.median_us,
                gbps=r.gbps(r.median_us),
                pct_hbm=100 * r.gbps(r.median_us) / hbm_gbps,
            )
            rows.append(d)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
