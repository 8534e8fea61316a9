"""The prefix cache on and off, side by side in one run: output tok/s, TTFT and hit rate.

    python benchmarks/prefix_cache.py --model benchmarks/models/llama-3.2-1b --load-format dummy

Two engines live in the process at once, one with ``enable_prefix_caching`` and one without,
with the same number of KV pages (the first sizes itself from ``--gpu-memory-utilization``,
the second copies its page count), and every repetition runs the workload on both, alternating
which goes first. Each repetition draws fresh tokens, so it starts with a cold cache.

Workloads (issue #18; random token ids, ``ignore_eos``, greedy):

* ``shared``: a 2,000-token system prompt, then 256 requests with 64-token questions and
  128-token outputs, all submitted at once;
* ``multiturn``: 32 conversations of 8 turns run side by side; each turn re-sends the whole
  history (a 256-token opening message, then 64-token user messages, 128-token replies);
* ``none``: 256 random 2,064-token prompts with 128-token outputs: what the cache costs when it
  cannot hit.

TTFT is from a request's submission to its first token (for ``shared`` and ``none``, queueing
behind the burst included). Output tok/s is every output token over the wall time from the
first submission to the last output. Ceiling: the workload's decode-only HBM bound (every
output token a decode row of a full batch, prefill free), with the HBM bandwidth measured in
this run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # benchmarks/ is not a package; harness puts the checkout on sys.path too
import torch

from graphrt import Engine, SamplingParams
from graphrt.measure import fmt_stat, measure_hbm_bandwidth, run_header, summarize

WORKLOADS = ("shared", "multiturn", "none")


def _tokens(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def burst(eng: Engine, prompts: list[list[int]], out_len: int) -> list[tuple[float, int, int]]:
    """Submit every prompt at once and run to the end. Per request: (TTFT s, prompt tokens,
    cached tokens)."""
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    ids = [eng.add_request(None, p, params, stream=False) for p in prompts]
    done: dict[str, Any] = {}
    while len(done) < len(ids):
        for out in eng.step():
            done[out.request_id] = out
    return [_row(done[i]) for i in ids]


def multiturn(
    eng: Engine, rng: random.Random, vocab: int, args: argparse.Namespace
) -> list[tuple[float, int, int]]:
    """``args.conversations`` conversations side by side, each submitting its next turn (the
    history, the reply, a new user message) as soon as its previous one has finished."""
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    history = {c: _tokens(rng, vocab, args.first_turn_len) for c in range(args.conversations)}
    left = dict.fromkeys(history, args.turns)
    live = {eng.add_request(None, history[c], params, stream=False): c for c in history}
    rows = []
    while live:
        for out in eng.step():
            c = live.pop(out.request_id)
            rows.append(_row(out))
            left[c] -= 1
            if left[c]:
                history[c] = out.prompt_token_ids + out.outputs[0].token_ids
                history[c] += _tokens(rng, vocab, args.turn_len)
                live[eng.add_request(None, history[c], params, stream=False)] = c
    return rows


def _row(out: Any) -> tuple[float, int, int]:
    m = out.metrics
    return (
        m["first_token_time"] - m["arrival_time"],
        len(out.prompt_token_ids),
        (out.num_cached_tokens or 0),
    )


def run(eng: Engine, workload: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(seed)
    vocab = eng.model_config.vocab_size
    if eng.runner.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if workload == "multiturn":
        rows = multiturn(eng, rng, vocab, args)
    else:
        system = _tokens(rng, vocab, args.system_len)
        prompts = []
        for _ in range(args.num_requests):
            head = system if workload == "shared" else _tokens(rng, vocab, args.system_len)
            prompts.append(head + _tokens(rng, vocab, args.question_len))
        rows = burst(eng, prompts, args.output_len)
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in rows)
    return {
        "output_tok_s": len(rows) * args.output_len / wall,
        "ttft_p50_ms": statistics.median(ttft) * 1e3,
        "ttft_p99_ms": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] * 1e3,
        "hit_rate": sum(r[2] for r in rows) / sum(r[1] for r in rows),
        "wall_s": wall,
        "requests": len(rows),
    }


def decode_bound(eng: Engine, workload: str, args: argparse.Namespace, bw: float) -> float:
    """Output tok/s if prefill cost nothing and every decode step ran a full batch at the HBM
    roofline (weights once per step, each row's KV once)."""
    r = eng.runner
    if workload == "multiturn":
        n = args.conversations * args.turns
        mean_prompt = args.first_turn_len + (args.turns - 1) / 2 * (args.turn_len + args.output_len)
    else:
        n, mean_prompt = args.num_requests, args.system_len + args.question_len
    tokens = n * args.output_len
    steps = -(-tokens // min(n, eng.config.max_num_seqs))
    kv = tokens * (mean_prompt + args.output_len / 2) * r.kv_spec.bytes_per_token
    return tokens / ((steps * r.step_weight_bytes + kv) / bw)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--system-len", type=int, default=2000)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--first-turn-len", type=int, default=256)
    p.add_argument("--turn-len", type=int, default=64, help="each later user message")
    p.add_argument("--json", type=Path, default=None)
    harness.add_engine_args(p, gpu_memory_utilization=0.42)  # both engines'
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (the table reports the median and the spread)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on = harness.build_engine(args, enable_prefix_caching=True)
    num_pages = on.pages.num_usable + 1  # the same KV pages for both
    off = harness.build_engine(args, enable_prefix_caching=False, num_pages=num_pages)
    dev = on.runner.device
    bw = measure_hbm_bandwidth(dev) if dev.type == "cuda" else None
    res = run_header("prefix_cache", str(on.model_dir), on, bw)
    res.update(num_pages=num_pages, settings=vars(args) | {"json": str(args.json)})
    # Warm-up: every kernel shape both engines will use, compiled before anything is timed.
    for eng in (on, off):
        burst(eng, [[11] * (args.system_len + args.question_len)] * 2, 4)
    res["workloads"] = {}
    for wl in args.workloads:
        runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for rep in range(args.repeats):
            order = [("on", on), ("off", off)] if rep % 2 == 0 else [("off", off), ("on", on)]
            for name, eng in order:
                runs[name].append(run(eng, wl, seed=1000 * rep + WORKLOADS.index(wl), args=args))
        stats = {name: {k: summarize(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        ratios = [a["output_tok_s"] / b["output_tok_s"] for a, b in zip(runs["on"], runs["off"])]
        ttft = [b["ttft_p50_ms"] / a["ttft_p50_ms"] for a, b in zip(runs["on"], runs["off"])]
        res["workloads"][wl] = {
            "runs": runs,
            "stats": stats,
            "throughput_ratio": summarize(ratios),
            "ttft_p50_speedup": summarize(ttft),
            "decode_bound_tok_s": decode_bound(on, wl, args, bw) if bw else None,
        }
        print_row(wl, res["workloads"][wl])
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
    on.shutdown()
    off.shutdown()
    return 0


def print_row(wl: str, r: dict[str, Any]) -> None:
    for name in ("on", "off"):
        s = r["stats"][name]
        print(
            f"{wl:<10} cache {name:<3}  output {fmt_stat(s['output_tok_s'], ',.0f')} tok/s  "
            f"TTFT p50 {fmt_stat(s['ttft_p50_ms'], ',.1f')} ms  "
            f"p99 {fmt_stat(s['ttft_p99_ms'], ',.1f')} "
            f"ms  hit rate {s['hit_rate']['median']:.1%}",
            flush=True,
        )
    bound = r["decode_bound_tok_s"]
    print(
        f"{wl:<10} on/off  throughput {fmt_stat(r['throughput_ratio'], '.2f')}x  TTFT p50 "
        f"{fmt_stat(r['ttft_p50_speedup'], '.2f')}x lower"
        + (f"  (ceiling: decode-only HBM bound {bound:,.0f} tok/s)" if bound else ""),
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
