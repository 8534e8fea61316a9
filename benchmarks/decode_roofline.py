"""Decode roofline: step time, tok/s and MBU by batch size, beside the HBM bandwidth measured in
the same run.

For each batch size ``bs`` it measures, at the same KV context per row:

- **engine**: steady-state decode of ``bs`` requests through ``Engine`` (scheduler, launcher
  thread, graph replay). The step time is the period between consecutive steps' ends on the GPU
  timeline (``StepProfiler`` CUDA events). One run per batch size: after ``--warmup-steps``
  full-batch decode steps, ``--repeats`` successive windows of ``--steps`` steps are the
  repetitions, so one prefill serves them all. Each window's bytes use its own KV lengths.
- **replay**: back-to-back replays of the bucket's CUDA graph with no scheduling, at the
  windows' mean context: the engine's ceiling. Overhead ratio = engine / replay (DESIGN.md).

Bytes per step = weight bytes + KV bytes read (the rows' KV lengths x bytes per token).
MBU = bytes / step time / HBM bandwidth, where the bandwidth is a 1 GiB device-to-device copy
(2 GiB read + written) timed at the start of this run. Roofline step = bytes / bandwidth;
tok/s = bs / step time. Medians and min-max spreads over the repeats.

    python benchmarks/decode_roofline.py --model benchmarks/models/llama-3.1-8b \\
        --load-format dummy --batch-sizes 1 8 64 256 --json roofline.json

On CPU (for tests) there is no bandwidth, no graph capture and no CUDA events: step times come
from the host clock and MBU is not reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # benchmarks/ is not a package; harness puts the checkout on sys.path too

from graphrt import Engine, SamplingParams
from graphrt.measure import (
    DecodeBench,
    fmt_stat,
    measure_hbm_bandwidth,
    run_header,
    run_until_idle,
    summarize,
)
from graphrt.overlap import StepProfiler
from graphrt.sampling import GREEDY
from graphrt.step_plan import StepPlan

DEFAULT_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class _KVProfiler(StepProfiler):
    """A ``StepProfiler`` that also keeps each plan's KV lengths, for the exact KV bytes read.

    Keeping a reference to the plan's (immutable) array costs one dict insert per step.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.seq_lens: dict[int, np.ndarray] = {}

    def record(self, plan: StepPlan):  # type: ignore[override]
        self.seq_lens[plan.step_id] = plan.seq_lens
        return super().record(plan)


def build_engine(args: argparse.Namespace) -> Engine:
    max_bs = max(args.batch_sizes)
    span = args.warmup_steps + args.repeats * args.steps
    # The longest request: a prompt, the windows, and margin for the prefill stagger.
    max_len = args.context_len + span + _prefill_steps(args, max_bs) + 16
    return harness.build_engine(
        args,
        max_num_seqs=max_bs,
        cuda_graph_max_bs=max_bs,
        # Exactly the measured sizes, so each bs replays its own bucket with no padding.
        cuda_graph_batch_sizes=tuple(sorted(set(args.batch_sizes))),
        max_model_len=-(-max_len // 64) * 64,
    )


def _prompt_len(args: argparse.Namespace) -> int:
    """Prompt length that puts the middle of the measured windows at ``--context-len``.

    A row's KV length at its k-th full-batch decode step is about prompt + 1 + k (the first
    token comes from the prefill); the windows span k = warmup + 1 .. warmup + repeats * steps.
    """
    return max(1, args.context_len - args.warmup_steps - args.repeats * args.steps // 2 - 2)


def _prefill_steps(args: argparse.Namespace, bs: int) -> int:
    return -(-bs * _prompt_len(args) // args.max_num_batched_tokens)


def engine_windows(eng: Engine, bs: int, args: argparse.Namespace) -> list[dict[str, float]]:
    """Decode ``bs`` requests; return one dict per measured window (step_ms, kv_tokens)."""
    prof = _KVProfiler(eng.runner.device)
    eng.set_profiler(prof)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + bs)
    vocab = eng.model_config.vocab_size
    prompt_len = _prompt_len(args)
    need = args.warmup_steps + args.repeats * args.steps + 1
    # Requests prefilled early decode inside mixed steps while later ones prefill, so the
    # full-batch decode steps number max_tokens minus the prefill stagger.
    max_tokens = need + _prefill_steps(args, bs) + 2
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(bs):
        eng.add_request(None, torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), params)
    try:
        host_end = run_until_idle(eng, prof.records)
    finally:
        eng.set_profiler(None)
    cuda = eng.runner.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    recs = [r for _, r in sorted(prof.records.items()) if r.is_decode and r.batch_size == bs]
    if len(recs) < need:
        raise RuntimeError(
            f"bs={bs}: only {len(recs)} full-batch decode steps, {need} needed "
            "(raise --max-num-batched-tokens so the prefill ends sooner)"
        )
    windows = []
    for k in range(args.repeats):
        w = recs[args.warmup_steps + k * args.steps : args.warmup_steps + (k + 1) * args.steps + 1]
        if cuda and w[0].end is not None:
            step_ms = w[0].end.elapsed_time(w[-1].end) / (len(w) - 1)
        else:
            step_ms = (host_end[w[-1].step_id] - host_end[w[0].step_id]) * 1e3 / (len(w) - 1)
        # Intervals end at steps w[1:]; those are the steps each interval's bytes belong to.
        kv = statistics.fmean(float(prof.seq_lens[r.step_id].sum()) for r in w[1:])
        windows.append({"step_ms": step_ms, "kv_tokens": kv, "graph_bs": w[-1].graph_bs})
    return windows


def replay_repeats(
    eng: Engine, bs: int, ctx: int, repeats: int, iters: int
) -> tuple[list[float], list[float]] | None:
    """Back-to-back replays of bucket ``bs`` at ``ctx`` tokens per row: (ms, issue us) lists."""
    graphs = eng.runner.graphs
    if graphs is None or (bs, GREEDY) not in graphs.graphs:
        return None
    bench = DecodeBench(eng, ctx)
    ms, issue = [], []
    for _ in range(repeats):
        m, us = bench.replay(bs, iters)
        ms.append(m)
        issue.append(us)
    return ms, issue


def measure(eng: Engine, args: argparse.Namespace, bw: float | None) -> list[dict[str, Any]]:
    r = eng.runner
    w_bytes = r.step_weight_bytes
    kv_tok = r.kv_spec.bytes_per_token
    rows = []
    for bs in args.batch_sizes:
        windows = engine_windows(eng, bs, args)
        step = [w["step_ms"] for w in windows]
        nbytes = [w_bytes + w["kv_tokens"] * kv_tok for w in windows]
        ctx = round(statistics.fmean(w["kv_tokens"] for w in windows) / bs)
        row: dict[str, Any] = {
            "bs": bs,
            "graph_bs": windows[0]["graph_bs"],
            "context_len": ctx,
            "engine": {
                "step_ms": summarize(step),
                "tok_s": summarize([bs / s * 1e3 for s in step]),
                "bytes_per_step": statistics.fmean(nbytes),
                "mbu": summarize([b / (s / 1e3) / bw for b, s in zip(nbytes, step)])
                if bw
                else None,
            },
        }
        rep_bytes = w_bytes + bs * ctx * kv_tok
        rep = replay_repeats(eng, bs, ctx, args.repeats, args.replay_iters)
        if rep is not None:
            ms, issue = rep
            row["replay"] = {
                "step_ms": summarize(ms),
                "tok_s": summarize([bs / m * 1e3 for m in ms]),
                "issue_us": summarize(issue),
                "bytes_per_step": rep_bytes,
                "mbu": summarize([rep_bytes / (m / 1e3) / bw for m in ms]) if bw else None,
            }
            med = row["replay"]["step_ms"]["median"]
            row["overhead_ratio"] = summarize([s / med for s in step])
        else:
            row["replay"] = None
            row["overhead_ratio"] = None
        row["roofline_ms"] = rep_bytes / bw * 1e3 if bw else None
        row["roofline_tok_s"] = bs / row["roofline_ms"] * 1e3 if bw else None
        rows.append(row)
        print_row(row)
    return rows


def print_header(header: dict[str, Any]) -> None:
    bw = header["hbm_bytes_per_s"]
    read = header.get("step_weight_bytes", header["weight_bytes"])
    print(
        f"decode roofline: {header['model']} ({header['weight_bytes'] / 1e9:.2f} GB "
        f"{header['dtype']}, {read / 1e9:.2f} GB of them read a step, KV "
        f"{header['kv_bytes_per_token']} B/token), "
        f"attention={header['attention_backend']}, on {header['device']}"
    )
    ceiling = f"{bw / 1e12:.2f} TB/s" if bw else "not measured (no CUDA)"
    print(f"ceiling: HBM bandwidth (1 GiB D2D copy, read + write, this run): {ceiling}")
    print(
        f"{'bs':>4} {'ctx':>5} | {'engine ms [min-max]':>26} | {'replay ms [min-max]':>26} | "
        f"{'roofline ms':>11} | {'overhead':>6} | {'engine tok/s':>12} | {'MBU engine':>10} | "
        f"{'MBU replay':>10}",
        flush=True,
    )


def print_row(row: dict[str, Any]) -> None:
    e, rp = row["engine"], row["replay"]

    def pct(stat: dict[str, Any] | None) -> str:
        return "-" if not stat else f"{stat['median']:.1%}"

    roof = f"{row['roofline_ms']:.3f}" if row["roofline_ms"] else "-"
    ratio = f"{row['overhead_ratio']['median']:.3f}" if row["overhead_ratio"] else "-"
    print(
        f"{row['bs']:>4} {row['context_len']:>5} | {fmt_stat(e['step_ms']):>26} | "
        f"{fmt_stat(rp['step_ms'] if rp else None):>26} | {roof:>11} | {ratio:>8} | "
        f"{e['tok_s']['median']:>12.0f} | {pct(e['mbu']):>10} | "
        f"{pct(rp['mbu'] if rp else None):>10}",
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # The engine's flags; the benchmark sets the batch sizes, graph buckets and context.
    harness.add_engine_args(p, max_num_batched_tokens=8192)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=DEFAULT_BATCH_SIZES)
    p.add_argument("--context-len", type=int, default=256, help="KV tokens per row (mid-window)")
    p.add_argument("--warmup-steps", type=int, default=8, help="full-batch steps not timed")
    p.add_argument("--steps", type=int, default=16, help="decode steps per repeat window")
    p.add_argument("--repeats", type=int, default=5, help="windows (and replay timings), >= 5")
    p.add_argument("--replay-iters", type=int, default=20, help="replays per replay timing")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON")
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be at least 5 (median and spread)")
    if args.steps < 2:
        p.error("--steps must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    want_cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    # Measured before the engine takes its share of memory; the same figure for every row.
    bw = measure_hbm_bandwidth(torch.device("cuda")) if want_cuda else None
    eng = build_engine(args)
    header = {
        **run_header("decode_roofline", str(eng.model_dir), eng, bw),
        "context_len": args.context_len,
        "prompt_len": _prompt_len(args),
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "repeats": args.repeats,
        "replay_iters": args.replay_iters,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    print_header(header)
    try:
        rows = measure(eng, args, bw)
    finally:
        eng.shutdown()
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
