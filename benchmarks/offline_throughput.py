"""Offline throughput: a seeded synthetic workload through graphrt, optionally beside HF
transformers in the same run.

The workload is ``--num-requests`` requests of random token ids with ``ignore_eos``: prompt
lengths uniform in [``--min-input-len``, ``--max-input-len``], output lengths uniform in
[``--min-output-len``, ``--max-output-len``] (default 1,000 requests, [64, 1024] and [64, 512]).
``--input-len``/``--output-len`` fix both ends (the fixed-shape mode). Every request is given to
``Engine.generate`` at once; each repeat reports request/s, output tok/s and total (prompt +
output) tok/s, and the summary gives median and min-max over ``--repeats``.

Ceiling: the workload's decode-only HBM bound, with the HBM bandwidth measured in this run (a
1 GiB device-to-device copy, bytes read + written): every decode step full (``max_num_seqs``
rows), reading the weights once plus each row's KV, and prefill free. No schedule can beat it,
so "% of ceiling" says how much of the card the engine gets.

``--peer hf`` runs a subsample of the same requests (the first ``--hf-max-requests``, outputs
capped at ``--hf-max-output-len``) through HF transformers, after graphrt has freed the GPU:

- ``generate``: eager ``model.generate`` in batches of ``--hf-batch-size``, left padding,
  requests sorted by output length so each batch's lengths are close, and
  ``min_new_tokens = max_new_tokens`` = the batch's longest output. Its tok/s counts every token
  it generated (padding rows past their own length too), which favours HF.
- ``cb``: HF's own continuous batching (the manager behind ``generate_batch``), each request with
  its own ``max_new_tokens`` and EOS off, if the installed transformers has it.

graphrt also runs that subsample, so there are two ratios: per token (graphrt on the whole
workload vs HF on the subsample) and on the same requests.

    python benchmarks/offline_throughput.py --model benchmarks/models/llama-3.2-1b \\
        --load-format dummy --peer hf --hf-max-requests 64 --hf-max-output-len 128 --json o.json
    python benchmarks/offline_throughput.py --model ... --input-len 128 --output-len 256 \\
        --num-requests 256
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # benchmarks/ is not a package; harness puts the checkout on sys.path too

from graphrt import Engine, SamplingParams
from graphrt.measure import (
    attention_flops,
    fmt_stat,
    measure_gemm_flops,
    measure_hbm_bandwidth,
    run_header,
    summarize,
    token_flops,
)
from graphrt.overlap import StepProfiler, StepRecord


@dataclass
class Workload:
    """Prompts (token ids) and the output length each request must produce."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    def subsample(self, n: int | None, cap: int | None) -> Workload:
        """The first ``n`` requests (the workload is random, so any prefix is a fair sample),
        outputs capped at ``cap`` tokens."""
        k = len(self.prompts) if n is None else min(n, len(self.prompts))
        outs = [min(o, cap) if cap else o for o in self.output_lens[:k]]
        return Workload(self.prompts[:k], outs)

    def describe(self) -> dict[str, Any]:
        p = [len(x) for x in self.prompts]
        return {
            "requests": len(p),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "prompt_len": {"min": min(p), "mean": statistics.fmean(p), "max": max(p)},
            "output_len": {
                "min": min(self.output_lens),
                "mean": statistics.fmean(self.output_lens),
                "max": max(self.output_lens),
            },
        }


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    rng = np.random.default_rng(args.workload_seed)
    n = args.num_requests
    p_lens = rng.integers(args.min_input_len, args.max_input_len + 1, size=n)
    o_lens = rng.integers(args.min_output_len, args.max_output_len + 1, size=n)
    prompts = [rng.integers(0, vocab_size, size=int(k)).tolist() for k in p_lens]
    return Workload(prompts, [int(x) for x in o_lens])


def throughput(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Per-repeat figures -> their summaries."""
    keys = ("elapsed_s", "requests_per_s", "output_tok_s", "total_tok_s")
    return {k: summarize([r[k] for r in runs]) for k in keys} | {"runs": runs}


def _rates(n_req: int, prompt_tok: int, out_tok: int, elapsed: float) -> dict[str, float]:
    return {
        "elapsed_s": elapsed,
        "requests_per_s": n_req / elapsed,
        "output_tok_s": out_tok / elapsed,
        "total_tok_s": (prompt_tok + out_tok) / elapsed,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- graphrt --------------------------------------------------------------------------------


def run_graphrt(eng: Engine, wl: Workload, repeats: int) -> dict[str, Any]:
    """``repeats`` timed ``generate`` calls over the whole workload."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in wl.output_lens]
    runs = []
    for _ in range(repeats):
        pre0 = getattr(eng.scheduler, "num_preemptions", 0)
        steps0, graph0 = eng.stats["steps"], eng.stats["graph_steps"]
        _sync(eng.runner.device)
        t0 = time.perf_counter()
        outs = eng.generate(wl.prompts, params)
        elapsed = time.perf_counter() - t0
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != wl.output_lens:
            bad = sum(g != w for g, w in zip(got, wl.output_lens))
            raise RuntimeError(f"graphrt: {bad} requests did not produce their output length")
        run = _rates(len(outs), wl.prompt_tokens, sum(got), elapsed)
        run["preemptions"] = getattr(eng.scheduler, "num_preemptions", 0) - pre0
        run["steps"] = eng.stats["steps"] - steps0
        run["graph_steps"] = eng.stats["graph_steps"] - graph0
        runs.append(run)
    return throughput(runs)


def _run_steps(eng: Engine, wl: Workload, on_step: Callable[[int], None] | None = None) -> int:
    """The workload through ``add_request`` + ``step`` (what ``generate`` does), calling
    ``on_step(i)`` before the i-th step. Returns the number of steps."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in wl.output_lens]
    for prompt, p in zip(wl.prompts, params):
        eng.add_request(None, prompt, p)
    i = 0
    while eng.has_unfinished():
        if on_step is not None:
            on_step(i)
        eng.step()
        i += 1
    eng.drain()
    return i


def _step_kind(rec: StepRecord) -> str:
    if rec.is_decode:
        return "decode, graph" if rec.graph_bs is not None else "decode, eager"
    return "prefill + decode, eager" if rec.decode_rows else "prefill only, eager"


def profile_steps(eng: Engine, wl: Workload) -> dict[str, Any]:
    """One more run of the workload with each step's GPU start/end events and CPU times
    (``StepProfiler``): the run's wall time split into GPU time per kind of step (decode steps
    replayed from graphs, eager steps carrying prefill chunks) and GPU idle between steps."""
    prof = StepProfiler(eng.runner.device)
    eng.set_profiler(prof)
    _sync(eng.runner.device)
    t0 = time.perf_counter()
    try:
        _run_steps(eng, wl)
        _sync(eng.runner.device)
    finally:
        eng.set_profiler(None)
    wall = time.perf_counter() - t0
    recs = [r for _, r in sorted(prof.records.items())]
    if not recs or recs[0].start is None:
        return {"wall_s": wall, "steps": len(recs), "cuda": False}
    return summarize_steps(recs, wall)


def summarize_steps(recs: list[StepRecord], wall: float) -> dict[str, Any]:
    """Per kind of step: count, GPU seconds (start to end event), share of the wall time, rows
    and prefill tokens per step, median CPU times; and the GPU idle between steps."""
    kinds: dict[str, dict[str, Any]] = {}
    for r in recs:
        k = kinds.setdefault(
            _step_kind(r),
            {"steps": 0, "gpu_s": 0.0, "rows": 0, "decode_rows": 0, "tokens": 0, "cpu": []},
        )
        k["steps"] += 1
        k["gpu_s"] += r.start.elapsed_time(r.end) / 1e3
        k["rows"] += r.batch_size
        k["decode_rows"] += r.decode_rows
        k["tokens"] += r.num_tokens
        k["cpu"].append((r.schedule_s, r.launch_s, r.process_s))
    # From the first start to the last end is the GPU's span; inside it, the time between one
    # step's end and the next one's start is the GPU waiting for the host.
    span = recs[0].start.elapsed_time(recs[-1].end) / 1e3
    idle = sum(max(0.0, a.end.elapsed_time(b.start)) for a, b in itertools.pairwise(recs)) / 1e3
    out_kinds = {}
    for name, k in kinds.items():
        n, cpu = k["steps"], k["cpu"]
        out_kinds[name] = {
            "steps": n,
            "gpu_s": k["gpu_s"],
            "gpu_ms_per_step": k["gpu_s"] / n * 1e3,
            "share_of_wall": k["gpu_s"] / wall,
            "rows_per_step": k["rows"] / n,
            "decode_rows_per_step": k["decode_rows"] / n,
            "prefill_tokens_per_step": (k["tokens"] - k["decode_rows"]) / n,
            "schedule_ms": statistics.median(c[0] for c in cpu) * 1e3,
            "launch_ms": statistics.median(c[1] for c in cpu) * 1e3,
            "process_ms": statistics.median(c[2] for c in cpu) * 1e3,
        }
    return {
        "cuda": True,
        "wall_s": wall,
        "steps": len(recs),
        "gpu_span_s": span,
        "gpu_idle_s": idle,
        "kinds": out_kinds,
    }


def profile_kernels(eng: Engine, wl: Workload, first: int, steps: int) -> dict[str, Any]:
    """One more run of the workload with ``torch.profiler`` on for ``steps`` steps from step
    ``first``: GPU kernels and copies grouped by name, per step of that window, and the
    window's GPU busy time (union of kernel intervals) against its span."""
    from step_profile import busy_us, gpu_events, group_events, span_us
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    graph0 = eng.stats["graph_steps"]
    seen = {"graph_at_start": 0, "graph_at_stop": 0}

    def on_step(i: int) -> None:
        if i == first:
            _sync(eng.runner.device)
            seen["graph_at_start"] = eng.stats["graph_steps"]
            prof.start()
        elif i == first + steps:
            _sync(eng.runner.device)
            prof.stop()
            seen["graph_at_stop"] = eng.stats["graph_steps"]

    total = _run_steps(eng, wl, on_step)
    if total < first + steps:
        if total > first:
            prof.stop()
        raise RuntimeError(f"the run had {total} steps; the window needs {first + steps}")
    events = gpu_events(prof)
    if not events:
        return {}
    span = span_us(events)
    grouped = group_events(events, steps)
    # Steps are processed one behind their launch, so the graph count lags by one step.
    graph = seen["graph_at_stop"] - seen["graph_at_start"]
    return {
        "first_step": first,
        "steps": steps,
        "graph_steps_in_window": graph,
        "span_us_per_step": span / steps,
        "busy_us_per_step": busy_us(events) / steps,
        "kernel_us_per_step": grouped["kernel_us"],
        "kernels": grouped["kernels"],
        "run_graph_steps": eng.stats["graph_steps"] - graph0,
    }


def print_profile(p: dict[str, Any] | None, k: dict[str, Any] | None, top: int = 14) -> None:
    if p and p.get("cuda"):
        print(
            f"\nwhere the time goes (one more run with per-step CUDA events, {p['steps']} steps, "
            f"wall {p['wall_s']:.2f} s, GPU span {p['gpu_span_s']:.2f} s, GPU idle between "
            f"steps {p['gpu_idle_s']:.2f} s):"
        )
        print(
            f"  {'kind':<24} {'steps':>6} {'GPU s':>7} {'of wall':>8} {'ms/step':>8} "
            f"{'rows':>6} {'prefill tok':>11} {'sched/launch/proc ms':>22}"
        )
        for name, r in sorted(p["kinds"].items(), key=lambda x: -x[1]["gpu_s"]):
            print(
                f"  {name:<24} {r['steps']:>6} {r['gpu_s']:>7.2f} {r['share_of_wall']:>8.1%} "
                f"{r['gpu_ms_per_step']:>8.2f} {r['rows_per_step']:>6.0f} "
                f"{r['prefill_tokens_per_step']:>11.0f} "
                f"{r['schedule_ms']:>6.2f}/{r['launch_ms']:.2f}/{r['process_ms']:.2f}"
            )
    if k:
        print(
            f"\nkernels, steps {k['first_step']}-{k['first_step'] + k['steps'] - 1} "
            f"(~{k['graph_steps_in_window']} of them graph replays): per step, GPU span "
            f"{k['span_us_per_step']:.0f} us, busy {k['busy_us_per_step']:.0f} us, kernel sum "
            f"{k['kernel_us_per_step']:.0f} us"
        )
        for row in k["kernels"][:top]:
            print(
                f"  {row['kernel'][:64]:<64} {row['calls']:>7.1f} calls {row['us']:>9.1f} us "
                f"{row['share']:>6.1%}"
            )


def decode_ceiling(
    wl: Workload, weight_bytes: int, kv_bytes_per_token: int, max_batch: int, bw: float
) -> dict[str, float]:
    """The workload's decode-only HBM bound: full batches, weights + KV read once per step.

    A request's first token comes from its prefill; each later token is one decode row that
    reads the request's KV so far (prompt + tokens generated).
    """
    decode_rows = sum(o - 1 for o in wl.output_lens)
    steps = -(-decode_rows // max_batch)
    kv_tokens = sum((o - 1) * len(p) + (o - 1) * o // 2 for p, o in zip(wl.prompts, wl.output_lens))
    nbytes = steps * weight_bytes + kv_tokens * kv_bytes_per_token
    t = nbytes / bw
    return {
        "decode_steps": steps,
        "decode_rows": decode_rows,
        "weight_bytes": steps * weight_bytes,
        "kv_bytes": kv_tokens * kv_bytes_per_token,
        "bytes": nbytes,
        "seconds": t,
        "output_tok_s": wl.output_tokens / t,
        "requests_per_s": len(wl.prompts) / t,
    }


def roofline_ceiling(
    wl: Workload, decode: dict[str, float], eng: Engine, gemm_flops_per_s: float, bw: float
) -> dict[str, float]:
    """The workload's roofline with its prompts: a lower bound on the time of any schedule of
    the decode-only bound's steps, with the prompts' tokens riding in them.

    Kernels run one after another, so the time is at least: the KV reads of decode attention
    at HBM bandwidth, plus the prompts' attention FLOPs at the GEMM rate, plus the dense layers,
    which take the longer of their weight reads (once per step) and their FLOPs (every decode
    row and prompt token) at the GEMM rate. A prompt token in a decode step shares that step's
    weight read, so prefill costs only where the dense layers are compute-bound, as at 256
    rows of Llama-3.2-1B on an H100."""
    body, head = token_flops(eng)
    prompt_tokens = sum(len(p) for p in wl.prompts)
    dense_flops = decode["decode_rows"] * (body + head) + prompt_tokens * body
    dense_flops += len(wl.prompts) * head
    attn_flops = sum(attention_flops(eng, len(p)) for p in wl.prompts)
    read_s, flop_s = decode["weight_bytes"] / bw, dense_flops / gemm_flops_per_s
    t = decode["kv_bytes"] / bw + attn_flops / gemm_flops_per_s + max(read_s, flop_s)
    return {
        "dense_flops": dense_flops,
        "prompt_attention_flops": attn_flops,
        "dense_seconds": max(read_s, flop_s),
        "dense_bound": "flops" if flop_s >= read_s else "bytes",
        "seconds": t,
        "output_tok_s": wl.output_tokens / t,
        "requests_per_s": len(wl.prompts) / t,
    }


# ---- HF transformers --------------------------------------------------------------------------


def load_hf_model(model_dir: str, dtype: torch.dtype, device: torch.device, attn: str):
    """Random-weight HF model of the same architecture, built directly on ``device``.

    HF's own weight init is skipped and every parameter drawn in one ``normal_`` each: the
    per-module init took 10 s for the 1B model and over 90 s for the 8B one on the H100 (runs
    H, I, L2), time the suite does not have. Speed does not depend on the values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext

    cfg = AutoConfig.from_pretrained(model_dir)
    std = float(getattr(cfg, "initializer_range", 0.02))
    # Built on the device: initialising 8B parameters on the CPU takes minutes.
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, std)
            elif name.endswith("bias"):
                param.zero_()
            else:  # norm scales
                param.fill_(1.0)
    return model.eval()


def hf_batches(wl: Workload, batch_size: int) -> list[list[int]]:
    """Request indices in batches, sorted by output length so a batch's lengths are close."""
    order = sorted(range(len(wl.prompts)), key=lambda i: wl.output_lens[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _hf_generate_batch(
    model, prompts: list[list[int]], new: int, device: torch.device, eos: Any
) -> int:
    """One left-padded eager ``generate`` call; every row makes ``new`` tokens. Returns the
    number of tokens generated."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    gen = GenerationConfig(
        do_sample=False, min_new_tokens=new, max_new_tokens=new, pad_token_id=0, eos_token_id=eos
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen
        )
    made = out.shape[1] - width
    if made != new:
        raise RuntimeError(f"HF generate made {made} tokens, {new} asked")
    return len(prompts) * made


def run_hf_generate(
    model, wl: Workload, batch_size: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """Eager ``generate`` in left-padded batches; every batch row makes the batch's longest
    output (``min_new_tokens = max_new_tokens``)."""
    eos = model.generation_config.eos_token_id
    # Warm-up (not timed): allocator, cuBLAS handles, kernels.
    _hf_generate_batch(model, [wl.prompts[0][:16]], 4, device, eos)
    batches = hf_batches(wl, batch_size)
    runs = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        generated = sum(
            _hf_generate_batch(
                model,
                [wl.prompts[i] for i in b],
                max(wl.output_lens[i] for i in b),
                device,
                eos,
            )
            for b in batches
        )
        _sync(device)
        elapsed = time.perf_counter() - t0
        run = _rates(len(wl.prompts), wl.prompt_tokens, generated, elapsed)
        run["generated_tokens"] = generated
        run["requested_output_tok_s"] = wl.output_tokens / elapsed
        runs.append(run)
    res = throughput(runs)
    res["requested_output_tok_s"] = summarize([r["requested_output_tok_s"] for r in runs])
    res["batch_size"] = batch_size
    res["num_batches"] = len(batches)
    res["generated_tokens"] = runs[0]["generated_tokens"]
    return res


def hf_cb_available(model) -> str | None:
    """None if HF's continuous batching API is there, else why not."""
    import transformers

    if not hasattr(model, "continuous_batching_context_manager"):
        return f"transformers {transformers.__version__} has no continuous batching API"
    return None


def run_hf_cb(
    model,
    wl: Workload,
    repeats: int,
    device: torch.device,
    cb_kwargs: dict[str, Any],
    timeout_s: float,
) -> dict[str, Any]:
    """HF's continuous batching manager (what ``generate_batch`` wraps), with per-request
    ``max_new_tokens`` so the work equals graphrt's; EOS is off (-1). One manager, warmed up
    once (not timed), serves every repeat."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        hints = WorkloadHints(
            max_prompt_length=max(len(p) for p in wl.prompts),
            max_generated_length=max(wl.output_lens),
            num_requests=len(wl.prompts),
        )
    except ImportError:
        hints = None
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=max(wl.output_lens), eos_token_id=-1, pad_token_id=0
    )
    cb_cfg = ContinuousBatchingConfig(**{k: v for k, v in cb_kwargs.items() if v is not None})
    kw: dict[str, Any] = {"generation_config": gen, "continuous_batching_config": cb_cfg}
    if hints is not None:
        kw["workload_hints"] = hints
    t_setup = time.perf_counter()
    runs = []
    with model.continuous_batching_context_manager(**kw) as manager:
        setup_s = time.perf_counter() - t_setup
        for rep in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            want = {}
            for i, (p, n) in enumerate(zip(wl.prompts, wl.output_lens)):
                rid = f"r{rep}-{i}"
                manager.add_request(p, request_id=rid, max_new_tokens=n, eos_token_id=-1)
                want[rid] = n
            made = 0
            while want:
                res = manager.get_result(timeout=1)
                if res is None:
                    if not manager.is_running():
                        raise RuntimeError("HF continuous batching loop stopped")
                    if time.perf_counter() - t0 > timeout_s:
                        raise TimeoutError(f"HF continuous batching: {len(want)} requests left")
                    continue
                if not res.is_finished() or res.request_id not in want:
                    continue
                if res.error:
                    raise RuntimeError(f"HF continuous batching: {res.error}")
                n = want.pop(res.request_id)
                if len(res.generated_tokens) != n:
                    raise RuntimeError(
                        f"HF continuous batching made {len(res.generated_tokens)} tokens, {n} asked"
                    )
                made += n
            _sync(device)
            runs.append(_rates(len(wl.prompts), wl.prompt_tokens, made, time.perf_counter() - t0))
    res = throughput(runs)
    res["setup_s"] = setup_s
    res["config"] = {k: v for k, v in dataclasses.asdict(cb_cfg).items() if _jsonable(v)}
    return res


def _jsonable(v: object) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, list, tuple))


def _safe(fn: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
    """Run one peer measurement; a failure is recorded, not fatal (graphrt's figures stand)."""
    try:
        return fn()
    except Exception as e:
        print(f"{what} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return {"error": f"{type(e).__name__}: {e}"}


# ---- driver -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=1000)
    w.add_argument("--min-input-len", type=int, default=64)
    w.add_argument("--max-input-len", type=int, default=1024)
    w.add_argument("--min-output-len", type=int, default=64)
    w.add_argument("--max-output-len", type=int, default=512)
    w.add_argument("--input-len", type=int, default=None, help="fixed prompt length")
    w.add_argument("--output-len", type=int, default=None, help="fixed output length")
    w.add_argument("--workload-seed", type=int, default=0)
    b = p.add_argument_group("measurement")
    b.add_argument("--repeats", type=int, default=5, help="timed runs (>= 5)")
    b.add_argument(
        "--profile",
        action="store_true",
        help="one more run with per-step CUDA events: GPU time per kind of step, GPU idle",
    )
    b.add_argument(
        "--profile-kernels",
        type=int,
        default=0,
        metavar="N",
        help="one more run with torch.profiler on for N steps from the middle of the run "
        "(or --profile-first): kernels grouped by name",
    )
    b.add_argument("--profile-first", type=int, default=None, help="first profiled step")
    b.add_argument("--json", type=Path, default=None, help="write results as JSON (rewritten as "
                   "each part finishes, so a killed run keeps what it measured)")  # fmt: skip
    h = p.add_argument_group("HF transformers peer")
    h.add_argument("--peer", choices=["none", "hf"], default="none")
    h.add_argument("--hf-modes", nargs="+", choices=["generate", "cb"], default=["generate", "cb"])
    h.add_argument("--hf-batch-size", type=int, default=64, help="eager generate batch size")
    h.add_argument("--hf-max-requests", type=int, default=64, help="requests HF runs (0: all)")
    h.add_argument("--hf-max-output-len", type=int, default=None, help="cap HF's output lengths")
    h.add_argument("--hf-repeats", type=int, default=None, help="default: --repeats")
    h.add_argument("--hf-attn-implementation", default="sdpa", help="for eager generate")
    h.add_argument("--hf-cb-num-blocks", type=int, default=None, help="default: HF sizes it")
    h.add_argument("--hf-cb-max-batch-tokens", type=int, default=None, help="default: HF's")
    h.add_argument("--hf-cb-timeout", type=float, default=900.0, help="seconds per repeat")
    harness.add_engine_args(p)
    args = p.parse_args(argv)
    if args.input_len is not None:
        args.min_input_len = args.max_input_len = args.input_len
    if args.output_len is not None:
        args.min_output_len = args.max_output_len = args.output_len
    if not 1 <= args.min_input_len <= args.max_input_len:
        p.error("input lengths must satisfy 1 <= min <= max")
    if not 1 <= args.min_output_len <= args.max_output_len:
        p.error("output lengths must satisfy 1 <= min <= max")
    if args.num_requests < 1:
        p.error("--num-requests must be positive")
    args.hf_repeats = args.hf_repeats or args.repeats
    if min(args.repeats, args.hf_repeats) < 5:
        p.error("--repeats and --hf-repeats must be at least 5 (median and spread)")
    return args


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What this workload needs whatever the flags say: a queue that holds all of it, and,
    unless given, a context just long enough for it (the model's limit, 131072 for Llama 3,
    would size page tables and the graphs' static KV bound far beyond it)."""
    fixed: dict[str, Any] = {
        "max_waiting_requests": max(args.max_waiting_requests, args.num_requests)
    }
    if args.max_model_len is None:
        longest = args.max_input_len + args.max_output_len
        fixed["max_model_len"] = -(-longest // 64) * 64
    return fixed


def print_summary(res: dict[str, Any]) -> None:
    h = res["header"]
    wl = h["workload"]
    print()
    print(
        f"offline throughput: {h['model']} on {h['device']}, {h['dtype']}, "
        f"attention={h['attention_backend']}, max_num_seqs={h['max_num_seqs']}"
    )
    print(
        f"workload: {wl['requests']} requests, prompt {wl['prompt_len']['min']}-"
        f"{wl['prompt_len']['max']} (mean {wl['prompt_len']['mean']:.0f}), output "
        f"{wl['output_len']['min']}-{wl['output_len']['max']} (mean "
        f"{wl['output_len']['mean']:.0f}) tokens, seed {h['workload_seed']}, ignore_eos"
    )
    g = res.get("graphrt")
    ceil = res.get("ceiling")
    if ceil:
        print(
            f"ceiling: decode-only HBM bound at {h['hbm_bytes_per_s'] / 1e12:.2f} TB/s (this run), "
            f"full batches of {h['max_num_seqs']}, prefill free: "
            f"{ceil['output_tok_s']:,.0f} output tok/s"
        )
    else:
        print("ceiling: not measured (no CUDA)")
    both = res.get("ceiling_roofline")
    if both:
        print(
            f"roofline with the prompts: KV reads at HBM bandwidth, prompt attention and the "
            f"longer of weight reads and dense FLOPs ({both['dense_bound']} here) at "
            f"{h['gemm_flops_per_s'] / 1e12:,.0f} TFLOP/s (dense bf16 GEMM, this run): "
            f"{both['output_tok_s']:,.0f} output tok/s"
        )
    if g:
        pct = (
            f" | {g['output_tok_s']['median'] / ceil['output_tok_s']:.1%} of ceiling"
            if ceil
            else ""
        )
        if both:
            pct += f", {g['output_tok_s']['median'] / both['output_tok_s']:.1%} of roofline"
        print(
            f"graphrt              req/s {fmt_stat(g['requests_per_s'], '.2f')} | output tok/s "
            f"{fmt_stat(g['output_tok_s'], ',.0f')} | total tok/s "
            f"{fmt_stat(g['total_tok_s'], ',.0f')}{pct}"
        )
    peer = res.get("peer")
    if not peer:
        return
    s = peer["subsample"]
    print(
        f"HF peer (transformers {peer['transformers']}): the first {s['requests']} requests, "
        f"outputs capped at {peer['max_output_len'] or 'none'} (mean output "
        f"{s['output_len']['mean']:.0f}, mean prompt {s['prompt_len']['mean']:.0f} tokens)"
    )
    for key, label in (
        ("graphrt_same_requests", "graphrt, same reqs"),
        ("generate", "HF generate"),
        ("cb", "HF cont. batching"),
    ):
        r = peer.get(key)
        if r is None:
            continue
        if "error" in r or "unavailable" in r:
            print(f"{label:<20} {r.get('error') or r.get('unavailable')}")
            continue
        extra = ""
        if key == "generate":
            extra = (
                f" | batch {r['batch_size']}, {r['num_batches']} batches, tok/s counts all "
                f"{r['generated_tokens']} generated tokens (requested only: "
                f"{fmt_stat(r['requested_output_tok_s'], ',.0f')})"
            )
        if key == "cb":
            extra = f" | warm-up {r['setup_s']:.1f} s, not timed"
        print(
            f"{label:<20} req/s {fmt_stat(r['requests_per_s'], '.2f')} | output tok/s "
            f"{fmt_stat(r['output_tok_s'], ',.0f')} | total tok/s "
            f"{fmt_stat(r['total_tok_s'], ',.0f')}{extra}"
        )
    for name, ratio in res.get("ratios", {}).items():
        print(f"ratio {name}: {ratio:.3g}x")


def compute_ratios(res: dict[str, Any]) -> dict[str, float]:
    """graphrt output tok/s over each HF mode's, per token and on the same requests."""
    out: dict[str, float] = {}
    peer = res.get("peer") or {}
    g = res.get("graphrt")
    same = peer.get("graphrt_same_requests")
    for key in ("generate", "cb"):
        hf = peer.get(key)
        if not hf or "output_tok_s" not in hf:
            continue
        hf_tok = hf["output_tok_s"]["median"]
        if g:
            out[f"graphrt_vs_hf_{key}"] = g["output_tok_s"]["median"] / hf_tok
        if same and "output_tok_s" in same:
            out[f"graphrt_vs_hf_{key}_same_requests"] = same["output_tok_s"]["median"] / hf_tok
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    want_cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    # Measured before the engine takes its share of memory.
    bw = measure_hbm_bandwidth(torch.device("cuda")) if want_cuda else None
    eng = harness.build_engine(args, **engine_overrides(args))
    r = eng.runner
    device = r.device
    wl = make_workload(args, eng.model_config.vocab_size)
    res: dict[str, Any] = {
        "header": {
            **run_header("offline_throughput", args.model, eng, bw),
            "max_num_seqs": eng.config.max_num_seqs,
            "max_num_batched_tokens": eng.config.max_num_batched_tokens,
            "admission_interval": eng.config.admission_interval,
            "max_model_len": eng.max_model_len,
            "num_pages": eng.pages.num_usable,
            "repeats": args.repeats,
            "workload_seed": args.workload_seed,
            "workload": wl.describe(),
            "argv": sys.argv[1:] if argv is None else list(argv),
        }
    }

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))

    if bw:
        res["ceiling"] = decode_ceiling(
            wl, r.step_weight_bytes, r.kv_spec.bytes_per_token, eng.config.max_num_seqs, bw
        )
        rate = measure_gemm_flops(device)
        res["header"]["gemm_flops_per_s"] = rate
        res["ceiling_roofline"] = roofline_ceiling(wl, res["ceiling"], eng, rate, bw)
    # Warm-up (not timed): kernels compile and autotune on their first shapes.
    t0 = time.perf_counter()
    warm = wl.subsample(min(32, args.num_requests), 8)
    eng.generate(warm.prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    res["header"]["warmup_s"] = time.perf_counter() - t0
    res["graphrt"] = run_graphrt(eng, wl, args.repeats)
    save()
    cuda = device.type == "cuda"
    if args.profile and cuda:
        res["profile"] = profile_steps(eng, wl)
        save()
    if args.profile_kernels and cuda:
        first = args.profile_first
        if first is None:
            first = max(0, int(res["graphrt"]["runs"][0]["steps"]) // 2 - args.profile_kernels // 2)
        res["profile_kernels"] = profile_kernels(eng, wl, first, args.profile_kernels)
        save()
    sub = None
    if args.peer == "hf":
        sub = wl.subsample(args.hf_max_requests or None, args.hf_max_output_len)
        res["peer"] = {
            "name": "hf",
            "transformers": __import__("transformers").__version__,
            "subsample": sub.describe(),
            "max_output_len": args.hf_max_output_len,
            "graphrt_same_requests": run_graphrt(eng, sub, args.hf_repeats),
        }
        save()
    dtype = r.settings.dtype
    eng.shutdown()
    del eng, r
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # What graphrt still holds here is memory the HF peer cannot use: record it.
        res["header"]["gpu_bytes_after_graphrt"] = torch.cuda.memory_allocated(device)
    if sub is not None:
        run_peer(args, res, sub, dtype, device, save)
    res["ratios"] = compute_ratios(res)
    save()
    print_summary(res)
    print_profile(res.get("profile"), res.get("profile_kernels"))
    return 0


def run_peer(
    args: argparse.Namespace,
    res: dict[str, Any],
    sub: Workload,
    dtype: torch.dtype,
    device: torch.device,
    save: Callable[[], None],
) -> None:
    """HF eager generate, then HF continuous batching, each saved as soon as it is measured."""
    peer = res["peer"]
    t0 = time.perf_counter()
    model = load_hf_model(args.model, dtype, device, args.hf_attn_implementation)
    peer["load_s"] = time.perf_counter() - t0
    if "generate" in args.hf_modes:
        peer["generate"] = _safe(
            lambda: run_hf_generate(model, sub, args.hf_batch_size, args.hf_repeats, device),
            "HF generate",
        )
        save()
    if "cb" in args.hf_modes:
        why = hf_cb_available(model)
        if why:
            peer["cb"] = {"unavailable": why}
        else:
            cb_kwargs = {
                "num_blocks": args.hf_cb_num_blocks,
                "max_batch_tokens": args.hf_cb_max_batch_tokens,
            }
            peer["cb"] = _safe(
                lambda: run_hf_cb(
                    model, sub, args.hf_repeats, device, cb_kwargs, args.hf_cb_timeout
                ),
                "HF continuous batching",
            )
        save()


if __name__ == "__main__":
    sys.exit(main())
