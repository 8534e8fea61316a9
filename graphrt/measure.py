"""Measurement helpers shared by ``capture-profile`` and the benchmarks: HBM bandwidth, GEMM
rate, prefill FLOPs, a decode bench of fake running rows over a live engine, GPU timing,
repeat statistics, and teacher-forced scoring of a text (FP8 accuracy)."""

from __future__ import annotations

import datetime
import gc
import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graphrt.engine import Engine
from graphrt.overlap import StepRecord
from graphrt.sampling import GREEDY


def step_window(window: Sequence[StepRecord]) -> dict[str, float | None]:
    """Per-step medians over ``window``, consecutive profiled steps (``StepProfiler`` records
    in step order, at least two): the scheduler thread's CPU planning (``schedule_ms``), taking
    the ids (``process_ms``) and on the text side (``text_ms``), its wait for the ids, the
    launcher's time; the share of steps launched after the step before had ended on the GPU
    (``late_steps``: the GPU waited for the host), of split steps whose sampler was launched
    after their forward had ended (``masks_late_steps``: the GPU waited for the masks; None
    without split steps or CUDA events) and of launches the scheduler waited for
    (``yielded_steps``); with CUDA events, the median, mean and longest period between step
    ends (``step_p50_ms``, ``step_mean_ms``, ``step_max_ms``), else None."""
    out: dict[str, float | None] = {
        f"{k}_ms": statistics.median(getattr(r, f"{k}_s") for r in window) * 1e3
        for k in ("schedule", "process", "text", "wait", "launch")
    }
    out["late_steps"] = sum(r.late for r in window[1:]) / (len(window) - 1)
    out["yielded_steps"] = sum(r.yielded for r in window) / len(window)
    split = [r for r in window if r.mid is not None]
    out["masks_late_steps"] = sum(r.masks_late for r in split) / len(split) if split else None
    out["step_p50_ms"] = out["step_mean_ms"] = out["step_max_ms"] = None
    if window[0].end is not None:
        torch.cuda.synchronize()
        periods = [a.end.elapsed_time(b.end) for a, b in itertools.pairwise(window)]
        out["step_p50_ms"] = statistics.median(periods)
        out["step_mean_ms"] = statistics.fmean(periods)
        out["step_max_ms"] = max(periods)
    return out


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    """Median, min and max of repeated measurements (``None`` entries skipped), with the values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "values": vals,
    }


def fmt_stat(stat: dict[str, Any] | None, spec: str = ".3f", scale: float = 1.0) -> str:
    """``median [min-max]`` of a :func:`summarize` dict, times ``scale``, or ``-``."""
    if not stat or stat.get("median") is None:
        return "-"
    m, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    return f"{m:{spec}} [{lo:{spec}}-{hi:{spec}}]"


def run_header(benchmark: str, model: str, eng: Engine, hbm_bytes_per_s: float | None) -> dict:
    """What every benchmark's JSON starts with: the run, the card, the model's byte counts and
    the engine settings that decide its speed. Callers add their own keys."""
    r = eng.runner
    dev = r.device
    return {
        "benchmark": benchmark,
        "model": model,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "hbm_bytes_per_s": hbm_bytes_per_s,
        "weight_bytes": r.weight_bytes,
        "step_weight_bytes": r.step_weight_bytes,
        "kv_bytes_per_token": r.kv_spec.bytes_per_token,
        "dtype": str(r.settings.dtype).removeprefix("torch."),
        "attention_backend": r.settings.attention_backend,
        "overlap": eng.config.overlap,
    }


def measure_gemm_flops(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """The card's dense GEMM rate in the model dtype's usual case: FLOP/s of an ``n`` x ``n`` x
    ``n`` bf16 matmul, best of ``iters``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.mm(a, b)
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) / 1e3)
    return 2 * n**3 / best


def token_flops(eng: Engine) -> tuple[float, float]:
    """FLOPs of one token through the model's dense layers: (the non-embedding weights, one
    row of the LM head). A decode row pays both; a prompt token pays the first, and only a
    prompt's last token pays the LM head."""
    c = eng.runner.model_cfg
    emb = c.vocab_size * c.hidden_size
    weights = sum(p.numel() for p in eng.runner.model.parameters()) - emb
    if not c.tie_word_embeddings:
        weights -= emb  # the LM head, counted apart
    return 2.0 * weights, 2.0 * emb


def attention_flops(eng: Engine, new: int, cached: int = 0) -> float:
    """Causal attention FLOPs (QK^T and PV) of ``new`` tokens after ``cached`` ones."""
    c = eng.runner.model_cfg
    ctx = new * cached + new * (new + 1) / 2  # sum over new tokens i of their context
    return 2 * 2 * c.num_layers * c.num_heads * c.head_dim * ctx


def prefill_flops(eng: Engine, prompt_len: int, cached: int = 0) -> float:
    """FLOPs of prefilling ``prompt_len`` tokens of which the first ``cached`` are in the KV
    cache: every non-embedding weight once per new token (the LM head once, for the last),
    plus causal attention, QK^T and PV, of each new token over its context."""
    body, head = token_flops(eng)
    new = prompt_len - cached
    return body * new + attention_flops(eng, new, cached) + head


def measure_hbm_bandwidth(device: torch.device, nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return nbytes / statistics.median(times)


class DecodeBench:
    """Sets up ``max_bs`` fake running rows, each with ``ctx`` tokens of cache."""

    def __init__(self, engine: Engine, ctx: int, max_rows: int | None = None) -> None:
        """``max_rows`` (default ``max_num_seqs``) rows are set up; more than the KV pool holds
        at ``ctx`` tokens a row is an error that says what to lower (see :meth:`rows_that_fit`)."""
        self.eng = engine
        r = engine.runner
        self.r = r
        self.ctx = ctx
        self.max_bs = engine.config.max_num_seqs if max_rows is None else max_rows
        pages_per_row = -(-ctx // engine.config.page_size)
        need = self.max_bs * pages_per_row
        if need > engine.pages.num_usable:
            raise SystemExit(
                f"KV pool has {engine.pages.num_usable} pages; {self.max_bs} rows of {ctx} "
                f"tokens need {need}. Lower --context-len or --max-num-seqs."
            )
        slots = np.arange(1, self.max_bs + 1, dtype=np.int64)
        self._pages_per_row = pages_per_row
        self.set_layout("rows")
        r.token_buf.random_(0, r.model_cfg.vocab_size)
        self.slots = slots
        self.seq_lens = np.full(self.max_bs, ctx, dtype=np.int64)

    @staticmethod
    def rows_that_fit(engine: Engine, ctx: int) -> int:
        """How many rows of ``ctx`` tokens the engine's KV pool holds."""
        return engine.pages.num_usable // -(-ctx // engine.config.page_size)

    def set_layout(self, layout: str) -> None:
        """Where the rows' pages lie in the pool. ``rows``: each row's pages consecutive, one
        row after another; ``interleaved``: the rows' first pages together, then their second
        pages, ... (what an allocator that hands every row a page at the same steps produces,
        as the engine's does for decode pages)."""
        r, n, w = self.r, self.max_bs, self._pages_per_row
        pages = torch.arange(1, n * w + 1, dtype=torch.int32)
        if layout == "rows":
            pages = pages.view(n, w)
        elif layout == "interleaved":
            pages = pages.view(w, n).T
        else:
            raise ValueError(f"unknown page layout {layout!r}; choose 'rows' or 'interleaved'")
        table = torch.zeros_like(r.page_table)
        table[1 : n + 1, :w] = pages.to(table.device)
        r.page_table.copy_(table)

    def inputs(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.r.device
        s = torch.from_numpy(self.slots[:bs]).to(dev)
        seq = torch.from_numpy(self.seq_lens[:bs]).to(dev)
        return s, seq - 1, seq

    def stage(self, bs: int) -> None:
        """Put ``bs`` of the rows in every slot of the graphs' input ring, which each replay
        reads (the graph's first kernel copies its slot into the static inputs)."""
        self.r.graphs.io.stage_all(self.slots[:bs], self.seq_lens[:bs], bs)

    def bytes_per_step(self, bs: int) -> int:
        spec = self.r.kv_spec
        kv = bs * self.ctx * spec.bytes_per_token
        return self.r.step_weight_bytes + kv

    def eager_ms(self, bs: int, iters: int) -> float:
        from graphrt.sampling import SampleOutputs

        r = self.r
        s, pos, seq = self.inputs(bs)
        out = SampleOutputs.allocate(bs, r.max_logprobs, r.device)
        bound = r.decode_kv_bound(self.ctx)
        host = self.seq_lens[:bs]

        def step() -> None:
            r.decode_forward(s, pos, seq, out, GREEDY, bound, seq_lens_host=host)

        return time_ms(step, iters, r.device)

    def replay(self, bs: int, iters: int) -> tuple[float, float]:
        g = self.r.graphs
        graph = g.graphs[(bs, GREEDY)]
        self.stage(bs)
        host_seq, host_slots = self.seq_lens[:bs], self.slots[:bs]
        self.r.attn.prepare_for_replay(bs, host_seq, host_slots)
        gpu_ms = time_ms(graph.replay, iters, self.r.device)
        busy, _ = self.issue_us(bs, iters)
        return gpu_ms, busy

    def issue_us(self, bs: int, iters: int) -> tuple[float, float]:
        """Median CPU microseconds to issue one replay (the backend's per-replay host work plus
        the launch): ``(busy, idle)``. Busy: issued while the previous replay still runs, as
        the launcher issues step n+1 during step n. Idle: issued right after a synchronize
        (a cold start: it also pays for the waiting thread's wake-up, and grows with the step's
        GPU time)."""
        graph = self.r.graphs.graphs[(bs, GREEDY)]
        host_seq, host_slots = self.seq_lens[:bs], self.slots[:bs]
        busy, idle = [], []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.r.attn.prepare_for_replay(bs, host_seq, host_slots)
            graph.replay()
            t1 = time.perf_counter()
            self.r.attn.prepare_for_replay(bs, host_seq, host_slots)
            graph.replay()
            t2 = time.perf_counter()
            idle.append(t1 - t0)
            busy.append(t2 - t1)
        torch.cuda.synchronize()
        return statistics.median(busy) * 1e6, statistics.median(idle) * 1e6


def time_ms(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    """Mean ms per call of ``fn`` over ``iters`` back-to-back calls (CUDA events on GPU)."""
    with torch.inference_mode():
        for _ in range(3):
            fn()
        if device.type != "cuda":
            t = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
            return statistics.median(t) * 1e3
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / iters


class GcPauses:
    """The cyclic garbage collector's pauses while the context is open (``gc.callbacks``): a
    collection runs on whichever thread allocated last, so a long one stalls the step loop."""

    def __init__(self) -> None:
        self.pauses_s: list[float] = []  # one per collection, in order
        self.full = 0  # collections of the oldest generation
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses_s.append(time.perf_counter() - self._t0)
            self.full += info.get("generation") == 2

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    @property
    def total_ms(self) -> float:
        return sum(self.pauses_s) * 1e3

    @property
    def max_ms(self) -> float:
        return max(self.pauses_s, default=0.0) * 1e3


def run_until_idle(eng: Engine, records: dict[int, Any]) -> dict[int, float]:
    """Step ``eng`` until every request is done; returns, per profiled step id, the host time of
    the first ``step()`` return after the step was planned (the CPU-only stand-in for a step's
    end when there are no CUDA events). O(1) per step: step ids only grow."""
    seen: dict[int, float] = {}
    next_id: int | None = None
    while eng.has_unfinished():
        eng.step()
        now = time.perf_counter()
        if next_id is None and records:
            next_id = min(records)
        while next_id is not None and next_id in records:
            seen[next_id] = now
            next_id += 1
    eng.drain()
    return seen


@dataclass(frozen=True)
class TeacherForced:
    """Per position ``i`` of a text, the model's view of token ``i + 1`` given tokens ``0..i``:
    its negative log-likelihood (``nll``) and the model's own top-1 token (``top1``)."""

    nll: torch.Tensor  # [T - 1] fp32, on the CPU
    top1: torch.Tensor  # [T - 1] int64, on the CPU

    @property
    def perplexity(self) -> float:
        return float(self.nll.mean().exp())

    def agreement(self, other: TeacherForced) -> float:
        """The share of positions where both models' top-1 tokens are the same."""
        return float((self.top1 == other.top1).double().mean())


def teacher_forced(eng: Engine, ids: list[int], chunk: int = 256) -> TeacherForced:
    """Score every position of ``ids`` in one causal forward of the engine's model (eager, torch
    attention over a KV cache of its own, so the engine's pool and slots are untouched); the
    lm_head runs ``chunk`` rows at a time to bound the logits' memory."""
    from graphrt.forward_batch import ForwardBatch
    from graphrt.kernels.attention_backend import AttentionSpec, AttnInputs
    from graphrt.kernels.torch_attention import TorchAttentionBackend

    r = eng.runner
    model, dev, c = r.model, r.device, r.model_cfg
    page = 16
    pages = -(-len(ids) // page) + 1  # page 0 left unused, as the engine's dummy page is
    shape = (pages, page, c.num_kv_heads, c.head_dim)
    dtype = r.settings.dtype
    # The engine's cache dtype and scales: an FP8 cache's rounding is part of what is scored.
    kv_dtype = r.kv_spec.dtype
    k = [torch.zeros(shape, dtype=kv_dtype, device=dev) for _ in range(c.num_layers)]
    v = [torch.zeros(shape, dtype=kv_dtype, device=dev) for _ in range(c.num_layers)]
    spec = AttentionSpec(
        c.num_heads, c.num_kv_heads, c.head_dim, page, pages, c.head_dim**-0.5, dtype, dev
    )
    n = len(ids)
    seq, cu = np.array([n]), np.array([0, n])
    inputs = AttnInputs(
        is_decode=False,
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        page_rows=torch.arange(1, pages, dtype=torch.int32, device=dev)[None],
        kv_len_bound=n,
        cu_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
        max_q_len=n,
        seq_lens_host=seq,
        cu_q_host=cu,
    )
    backend = TorchAttentionBackend(spec, k, v, r.kv_scales)
    tokens = torch.tensor(ids, dtype=torch.int64, device=dev)
    positions = torch.arange(n, device=dev)
    fb = ForwardBatch(
        input_ids=tokens,
        positions=positions,
        kv_locs=positions + page,  # page p holds positions (p - 1) * page ...
        logits_rows=None,  # every position's logits, in order
        attn_backend=backend,
        attn_meta=backend.prepare_metadata(inputs),
    )
    nll, top1 = [], []
    with torch.inference_mode():
        hidden = model(fb)[:-1]
        for s in range(0, n - 1, chunk):
            logp = model.compute_logits(hidden[s : s + chunk]).float().log_softmax(-1)
            nxt = tokens[s + 1 : s + 1 + chunk]
            nll.append(-logp.gather(1, nxt[:, None])[:, 0].cpu())
            top1.append(logp.argmax(-1).cpu())
    return TeacherForced(torch.cat(nll), torch.cat(top1))
