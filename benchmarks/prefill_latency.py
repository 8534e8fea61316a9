"""Time to first token of one prompt, and the CPU cost of launching its step, with steps that
carry prefill tokens captured as CUDA graphs (mixed graphs) and run eagerly, side by side.

    python benchmarks/prefill_latency.py --model benchmarks/models/llama-3.2-1b --load-format dummy

Two engines live in the process at once, identical but for ``cuda_graph_max_tokens`` (the
second has 0: eager). Each repetition sends one fresh random prompt of each length to both,
alternating which goes first (fresh tokens: the prefix cache cannot hit), with ``max_tokens=1``.

Per engine and prompt length: TTFT (``generate`` wall time: submission to the first token),
the launcher's CPU time for the prefill step (``StepRecord.launch_s``: the replay, or every
eager launch) and the step's GPU span (its start and end events). Ceiling: the larger of the
prompt's FLOPs (2 x non-embedding weights per token, plus causal attention) at the dense bf16
GEMM rate and one read of the weights at the HBM bandwidth, both measured in this run (a short
prompt is bound by the weight read: 128 tokens on Llama-3.2-1B need 0.32 ms of FLOPs but
0.85 ms to read 2.5 GB). On CPU (the suite's smoke run) there are no graphs, GPU spans or
ceiling: both engines run the same uncaptured step functions, and the TTFT and launch columns
only check the plumbing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # benchmarks/ is not a package; harness puts the checkout on sys.path too
import torch

from graphrt import Engine, SamplingParams
from graphrt.measure import (
    fmt_stat,
    measure_gemm_flops,
    measure_hbm_bandwidth,
    prefill_flops,
    run_header,
    summarize,
)
from graphrt.overlap import StepProfiler


def one(eng: Engine, prompt: list[int]) -> dict[str, float]:
    prof = StepProfiler(eng.runner.device)
    eng.set_profiler(prof)
    t0 = time.perf_counter()
    eng.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    ttft = time.perf_counter() - t0
    eng.set_profiler(None)
    if eng.runner.device.type == "cuda":
        torch.cuda.synchronize()
    recs = [r for r in prof.records.values() if not r.is_decode]
    if len(recs) != 1:
        raise RuntimeError(f"expected one prefill step, saw {len(recs)} (raise the token budget)")
    r = recs[0]
    return {
        "ttft_ms": ttft * 1e3,
        "launch_ms": r.launch_s * 1e3,
        "gpu_ms": r.start.elapsed_time(r.end) if r.start is not None else None,
        "graph": float(r.graph_tokens is not None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--profile-kernels",
        type=int,
        default=0,
        metavar="N",
        help="after timing, N more prompts of each length per engine under torch.profiler: "
        "GPU kernels grouped by name, per step (use --no-pdl to attribute time per kernel)",
    )
    harness.add_engine_args(p, gpu_memory_utilization=0.4)  # both engines'
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3")
    graphs = harness.build_engine(args)
    # The same KV pages for both; the second runs every step with prefill tokens eagerly.
    eager = harness.build_engine(
        args, cuda_graph_max_tokens=0, num_pages=graphs.pages.num_usable + 1
    )
    dev = graphs.runner.device
    rate = measure_gemm_flops(dev) if dev.type == "cuda" else None
    hbm = measure_hbm_bandwidth(dev) if dev.type == "cuda" else None
    read_ms = graphs.runner.step_weight_bytes / hbm * 1e3 if hbm else None
    res: dict[str, Any] = run_header("prefill_latency", str(graphs.model_dir), graphs, hbm)
    res.update(gemm_flops_per_s=rate, settings=vars(args) | {"json": str(args.json)})
    rng = random.Random(0)
    vocab = graphs.runner.model_cfg.vocab_size
    for eng in (graphs, eager):  # compile and warm every shape first
        for n in args.prompt_lens:
            for _ in range(3):
                one(eng, [rng.randrange(10, vocab) for _ in range(n)])
    res["lens"] = {}
    if rate and hbm:
        print(
            f"dense bf16 GEMM rate measured: {rate / 1e12:,.0f} TFLOP/s; HBM {hbm / 1e12:.2f} "
            f"TB/s: the weights ({graphs.runner.step_weight_bytes / 1e9:.2f} GB) read in "
            f"{read_ms:.2f} ms",
            flush=True,
        )
    for n in args.prompt_lens:
        runs: dict[str, list[dict[str, float]]] = {"graphs": [], "eager": []}
        for rep in range(args.repeats):
            order = [("graphs", graphs), ("eager", eager)]
            for name, eng in order if rep % 2 == 0 else order[::-1]:
                runs[name].append(one(eng, [rng.randrange(10, vocab) for _ in range(n)]))
        stats = {k: {m: summarize(r[m] for r in rs) for m in rs[0]} for k, rs in runs.items()}
        flop_ms = prefill_flops(graphs, n) / rate * 1e3 if rate else None
        bound_ms = max(flop_ms, read_ms) if flop_ms and read_ms else None
        res["lens"][n] = {
            "runs": runs,
            "stats": stats,
            "flop_bound_ms": flop_ms,
            "weight_read_ms": read_ms,
            "bound_ms": bound_ms,
        }
        for name in ("graphs", "eager"):
            s = stats[name]
            print(
                f"{n:>6} tokens  {name:<6}  TTFT {fmt_stat(s['ttft_ms'], '.2f')} ms  launch CPU "
                f"{fmt_stat(s['launch_ms'], '.2f')} ms  GPU {fmt_stat(s['gpu_ms'], '.2f')} ms  "
                f"(ceiling {_ms(bound_ms)}: FLOPs {_ms(flop_ms)}, weight read {_ms(read_ms)}; "
                "through mixed graphs: "
                f"{s['graph']['median']:.0%})",
                flush=True,
            )
        if args.profile_kernels and dev.type == "cuda":
            res["lens"][n]["kernels"] = {
                name: profile(eng, n, args.profile_kernels, rng)
                for name, eng in (("graphs", graphs), ("eager", eager))
            }
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
    graphs.shutdown()
    eager.shutdown()
    return 0


def profile(eng: Engine, n: int, steps: int, rng: random.Random) -> dict[str, Any]:
    """``steps`` fresh prompts of ``n`` tokens under torch.profiler: the GPU kernels of their
    prefill steps grouped by name, per step, printed and returned."""
    from step_profile import busy_us, group_events, profile_events

    vocab = eng.runner.model_cfg.vocab_size
    prompts = [[rng.randrange(10, vocab) for _ in range(n)] for _ in range(steps)]
    it = iter(prompts)
    events = profile_events(lambda: one(eng, next(it)), steps)
    table = group_events(events, steps)
    table["busy_us"] = busy_us(events) / steps
    kind = "mixed graph" if eng.runner.mixed_graphs is not None else "eager"
    print(f"\n{n} tokens, {kind}: kernel sum {table['kernel_us']:.0f} us/step, GPU busy "
          f"{table['busy_us']:.0f} us/step, {table['launches']:.0f} launches")  # fmt: skip
    for k in table["kernels"][:16]:
        print(f"  {k['us']:9.1f} us  {k['calls']:5.0f}x  {k['share']:6.1%}  {k['kernel']}")
    return table


def _ms(v: float | None) -> str:
    return "not measured (no CUDA)" if v is None else f"{v:.2f} ms"


if __name__ == "__main__":
    raise SystemExit(main())
