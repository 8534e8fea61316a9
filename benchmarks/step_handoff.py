"""What the GPU pays for the work around a decode graph, with the CPU out of the picture.

An engine step is more than the bucket's graph: the launcher records the step's ``copy_done``
event after the replay. This benchmark enqueues ``--iters`` such steps back to back, far ahead
of the GPU (so no step ever waits for the CPU), and reports each variant's period beside the
graph replayed alone, the ceiling. The difference is what the hand-offs cost on the GPU itself,
separately from whether the launcher keeps up (``overlap_ablation.py`` measures that).

Variants (interleaved within each repetition; medians and min-max over ``--repeats``):

- ``replay``: the bucket's graph alone, back to back. Its first kernel loads the step's inputs
  from a pinned ring slot and its last stores the sampled ids there (``StepIO``);
- ``step``: what the launcher enqueues per graph step: the replay and the ``copy_done`` record;
- ``step, timing events``: plus the two timing events the ablation's profiler records;
- ``step, 1 ahead`` (``, query loop``): ``step`` paced as the engine paces it, the host waiting
  (``synchronize``, or polling ``query``) for step k-1's event after enqueuing step k, with no
  other host work: what one-step-ahead pacing itself costs;
- ``decode alone``: the same decode step captured without the ring's load and store, on static
  inputs already on the device (the graphs before the ring);
- ``decode alone, copies (before)``: what the engine enqueued per step before the ring: one H2D
  copy of the pinned staging buffer, that graph, a D2H copy of the ids and the event.

Then, per batch size, the replay with two page layouts timed alternately: every row's pages
consecutive (DecodeBench's, the ceiling's) and the rows' pages interleaved.

    python benchmarks/step_handoff.py --model benchmarks/models/llama-3.2-1b \\
        --load-format dummy --batch-sizes 64 256 --json handoff.json

GPU only: without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # benchmarks/ is not a package; harness puts the checkout on sys.path too

from graphrt.capture.graph_runner import capture_graph
from graphrt.measure import DecodeBench, fmt_stat, run_header, summarize, time_ms
from graphrt.sampling import GREEDY


def capture_decode_alone(bench: DecodeBench, bs: int) -> torch.cuda.CUDAGraph:
    """Bucket ``bs``'s greedy decode step captured without the ring's load and store: it reads
    the static inputs already on the device, in the engine's graph pool. (The graphs before the
    ring also began with a page-table scatter kernel, 1.5 us at batch 256; runs up to S8
    included it here.)"""
    r = bench.r
    g = r.graphs
    slots, positions, seq_lens = g.buffers.views(bs)
    out = g.buffers.out.narrow(bs)

    def step() -> None:
        r.decode_forward(slots, positions, seq_lens, out, GREEDY, g.kv_len_bound, capture_bs=bs)

    return capture_graph(step, g.pool)


def variants(bench: DecodeBench, bs: int, old: bool = True) -> dict[str, Callable[[], None]]:
    """The step variants of the module docstring for bucket ``bs``, as callables; ``old``:
    also the decode step without the ring, alone and with the copies the engine used to
    enqueue around it (one more capture of the bucket)."""
    r = bench.r
    g = r.graphs
    graph = g.graphs[(bs, GREEDY)]
    bench.stage(bs)
    done = torch.cuda.Event()

    def step() -> None:
        graph.replay()
        done.record()

    # The timing events overlap_ablation's StepProfiler records around every step: what
    # measuring costs the GPU.
    t_start, t_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def profiled() -> None:
        t_start.record()
        step()
        t_end.record()

    fns: dict[str, Callable[[], None]] = {
        "replay": graph.replay,
        "step": step,
        "step, timing events": profiled,
    }
    # Paced as the engine paces it: after enqueuing step k the host waits for step k-1's
    # copy_done (a ring of events, as the launcher's pool), so the GPU never has more than the
    # running step and one more queued. With no Python work in between, any excess over
    # ``step`` is the cost of that pacing itself.
    ring = [torch.cuda.Event() for _ in range(4)]
    tick = [0]

    def paced(spin: bool) -> None:
        k = tick[0]
        tick[0] += 1
        graph.replay()
        ring[k % 4].record()
        if k >= 1:
            prev = ring[(k - 1) % 4]
            if spin:
                while not prev.query():
                    pass
            else:
                prev.synchronize()

    fns["step, 1 ahead"] = lambda: paced(False)
    fns["step, 1 ahead, query loop"] = lambda: paced(True)
    if not old:
        return fns
    alone = capture_decode_alone(bench, bs)
    inputs = g.buffers.inputs
    staging = g.io.inputs[0].T.to(torch.int64).contiguous().pin_memory()  # the old layout
    inputs.copy_(staging)
    ids_host = torch.empty(g.max_bs, dtype=torch.int64).pin_memory()
    ids_dev = g.buffers.out.ids

    def before() -> None:
        inputs.copy_(staging, non_blocking=True)
        alone.replay()
        ids_host[:bs].copy_(ids_dev[:bs], non_blocking=True)
        done.record()

    fns["decode alone"] = alone.replay
    fns["decode alone, copies (before)"] = before
    return fns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_engine_args(p)  # the batch sizes, buckets and context are the benchmark's
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--context-len", type=int, default=320)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_handoff: no CUDA device; nothing to measure")
        return 0
    max_bs = max(args.batch_sizes)
    eng = harness.build_engine(
        args,
        max_num_seqs=max_bs,
        cuda_graph_max_bs=max_bs,
        cuda_graph_batch_sizes=tuple(sorted(args.batch_sizes)),
        max_model_len=max(2048, args.context_len + 16),
    )
    bench = DecodeBench(eng, args.context_len)
    dev = eng.runner.device
    header = run_header("step_handoff", str(eng.model_dir), eng, None)
    rows = []
    for bs in args.batch_sizes:
        fns = variants(bench, bs)
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                samples[name].append(time_ms(fn, args.iters, dev))
        # Where the pages lie: the replay with every row's pages consecutive (DecodeBench's
        # layout, the ceiling) against the rows' pages interleaved (an allocator that hands
        # every row a page at the same steps, as the engine's does for decode pages).
        layouts: dict[str, list[float]] = {"rows": [], "interleaved": []}
        for _ in range(args.repeats):
            for layout, vals in layouts.items():
                bench.set_layout(layout)
                vals.append(time_ms(fns["replay"], args.iters, dev))
        bench.set_layout("rows")
        base = summarize(samples["replay"])["median"]
        print(f"\nbs={bs}, ctx {args.context_len}: ms per step, median [min-max] of {args.repeats}")
        for name, vals in samples.items():
            s = summarize(vals)
            extra_us = (s["median"] - base) * 1e3
            rows.append({"bs": bs, "variant": name, "ms": s, "extra_us": extra_us})
            print(
                f"  {name:<30} {fmt_stat(s, '.4f')}  "
                f"{s['median'] / base:.4f}x replay, {extra_us:+.1f} us"
            )
        rows_ms = summarize(layouts["rows"])
        inter_ms = summarize(layouts["interleaved"])
        rows.append({"bs": bs, "variant": "replay, pages by row", "ms": rows_ms, "extra_us": None})
        rows.append(
            {"bs": bs, "variant": "replay, pages interleaved", "ms": inter_ms, "extra_us": None}
        )
        print(
            f"  page layout: by row {rows_ms['median']:.4f} ms, interleaved across rows "
            f"{fmt_stat(inter_ms, '.4f')} ms "
            f"({inter_ms['median'] / rows_ms['median']:.4f}x)"
        )
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    eng.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
