"""What the GPU pays for the work around a decode graph, with the CPU out of the picture.

An engine step is more than the bucket's graph: its inputs go up from pinned staging memory
before the replay, the sampled ids come back into pinned memory after it, and events are
recorded. This benchmark enqueues ``--iters`` such steps back to back, far ahead of the GPU (so
no step ever waits for the CPU), and reports each variant's period beside the graph replayed
alone, the ceiling. The difference is what the hand-offs between those operations cost on the
GPU itself, separately from whether the launcher keeps up (``overlap_ablation.py`` measures
that).

Variants (cumulative, in the engine's order):

- ``replay``: the graph alone, back to back;
- ``in3``: three per-row H2D copies of the staging rows, then the replay;
- ``in1``: one H2D copy of the whole ``[3, max_bs]`` staging buffer, then the replay;
- ``in3+out`` / ``in1+out``: plus the D2H copy of the sampled ids and the ``copy_done``
  event record after the replay (``in1+out`` is what the engine enqueues per graph step);
- ``in1+out, timing events``: plus the two timing events the ablation's profiler records
  around each step;
- ``in1+out, 1 ahead`` (``, query loop``): ``in1+out`` paced as the engine paces it, the host
  waiting (``synchronize``, or polling ``query``) for step k-1's event after enqueuing step k,
  with no other host work: what one-step-ahead pacing itself costs;
- ``zin+out``, ``zin+zout``: the inputs read by a kernel straight from the pinned staging
  memory (zero-copy, no copy engine), and the ids written by a kernel straight into pinned
  memory. Shown only where Triton accepts pinned host pointers on this machine.

Variants are interleaved within each repetition; medians and min-max over ``--repeats``.

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
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from graphrt import Engine
from graphrt.capture.measure import DecodeBench, run_header, summarize, time_ms
from graphrt.sampling import GREEDY


@triton.jit
def _copy_i64_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def zero_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy ``src`` to ``dst`` (contiguous, int64) with a kernel; either may be pinned host
    memory, which the GPU reads and writes over PCIe without the copy engine."""
    n = src.numel()
    _copy_i64_kernel[(triton.cdiv(n, 1024),)](src, dst, n, BLOCK=1024)


def cuda_view(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over pinned host memory ``t`` (UVA: the same address on both sides), so
    that torch's device kernels write it directly."""

    class _Interface:
        def __init__(self) -> None:
            self.__cuda_array_interface__ = {
                "shape": tuple(t.shape),
                "typestr": "<i8",
                "data": (t.data_ptr(), False),
                "version": 2,
                "strides": None,
            }

    view = torch.as_tensor(_Interface(), device="cuda")
    view._host = t  # keep the memory alive with the view
    return view


def capture_variant(
    bench: DecodeBench,
    bs: int,
    first: Callable[[], None] | None,
    last: Callable[[], None] | None,
) -> torch.cuda.CUDAGraph:
    """Bucket ``bs``'s greedy decode graph with ``first`` captured before it and ``last`` after
    it, in the engine's graph pool."""
    from graphrt.capture.static_buffers import UPDATES

    r = bench.r
    g = r.graphs
    slots, positions, seq_lens = g.buffers.views(bs)
    out = g.buffers.out.narrow(bs)
    updates = g.buffers.inputs[UPDATES:, :bs]

    def step() -> None:
        if first is not None:
            first()
        r.ops.scatter_page_updates(r.page_table, updates)
        r.decode_forward(slots, positions, seq_lens, out, GREEDY, g.kv_len_bound, capture_bs=bs)
        if last is not None:
            last()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, pool=g.pool):
        step()
    return graph


def variants(
    bench: DecodeBench, bs: int, with_zero_copy: bool = True
) -> dict[str, Callable[[], None]]:
    """The step variants of the module docstring for bucket ``bs``, as callables."""
    r = bench.r
    g = r.graphs
    graph = g.graphs[(bs, GREEDY)]
    inputs = g.buffers.inputs
    s, pos, seq = bench.inputs(bs)
    staging = torch.empty_like(inputs, device="cpu").pin_memory()
    staging.copy_(inputs.cpu())
    staging[0, :bs].copy_(s.cpu())
    staging[1, :bs].copy_(pos.cpu())
    staging[2, :bs].copy_(seq.cpu())
    ids_host = torch.empty(g.max_bs, dtype=torch.int64).pin_memory()
    ids_dev = g.buffers.out.ids
    done = torch.cuda.Event()
    staged = torch.cuda.Event()

    def in3() -> None:
        for row in range(3):
            inputs[row, :bs].copy_(staging[row, :bs], non_blocking=True)
        staged.record()

    def in1() -> None:
        inputs.copy_(staging, non_blocking=True)
        staged.record()

    def out() -> None:
        ids_host[:bs].copy_(ids_dev[:bs], non_blocking=True)
        done.record()

    def zin() -> None:
        zero_copy(staging, inputs)
        staged.record()

    def zout() -> None:
        zero_copy(ids_dev[:bs], ids_host[:bs])
        done.record()

    # The timing events overlap_ablation's StepProfiler records around every step (one before
    # the inputs' copy, one after copy_done): what measuring costs the GPU.
    t_start, t_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def profiled() -> None:
        t_start.record()
        in1()
        graph.replay()
        out()
        t_end.record()

    out_fns: dict[str, Callable[[], None]] = {
        "replay": graph.replay,
        "in3": lambda: (in3(), graph.replay()),
        "in1": lambda: (in1(), graph.replay()),
        "in3+out": lambda: (in3(), graph.replay(), out()),
        "in1+out": lambda: (in1(), graph.replay(), out()),
        "in1+out, timing events": profiled,
    }
    # Paced as the engine paces it: after enqueuing step k the host waits for step k-1's
    # copy_done (a ring of events, as the launcher's pool), so the GPU never has more than the
    # running step and one more queued. With no Python work in between, any excess over
    # ``in1+out`` is the cost of that pacing itself.
    ring = [torch.cuda.Event() for _ in range(4)]
    tick = [0]

    def paced(spin: bool) -> None:
        k = tick[0]
        tick[0] += 1
        in1()
        graph.replay()
        ids_host[:bs].copy_(ids_dev[:bs], non_blocking=True)
        ring[k % 4].record()
        if k >= 1:
            prev = ring[(k - 1) % 4]
            if spin:
                while not prev.query():
                    pass
            else:
                prev.synchronize()

    out_fns["in1+out, 1 ahead"] = lambda: paced(False)
    out_fns["in1+out, 1 ahead, query loop"] = lambda: paced(True)
    if not with_zero_copy:
        return out_fns
    try:  # does Triton take a pinned host pointer here?
        zero_copy(staging, inputs)
        zero_copy(ids_dev[:bs], ids_host[:bs])
        torch.cuda.synchronize()
        if not torch.equal(inputs.cpu(), staging) or not torch.equal(
            ids_host[:bs], ids_dev[:bs].cpu()
        ):
            raise RuntimeError("zero-copy kernel copied the wrong values")
        out_fns["zin+out"] = lambda: (zin(), graph.replay(), out())
        out_fns["zin+zout"] = lambda: (zin(), graph.replay(), zout())
        out_fns["in1+zout"] = lambda: (in1(), graph.replay(), zout())
        ids_view = cuda_view(ids_host)

        def tout() -> None:
            ids_view[:bs].copy_(ids_dev[:bs])
            done.record()

        out_fns["in1+tout"] = lambda: (in1(), graph.replay(), tout())
        # The inputs' load (and the ids' store) inside the graph, from and to fixed pinned
        # buffers: what a step costs when the graph is all it enqueues.
        g_in = capture_variant(bench, bs, lambda: zero_copy(staging, inputs), None)
        g_io = capture_variant(
            bench,
            bs,
            lambda: zero_copy(staging, inputs),
            lambda: zero_copy(ids_dev[:bs], ids_host[:bs]),
        )
        tiny = torch.cuda.CUDAGraph()
        with torch.cuda.graph(tiny):
            zero_copy(staging, inputs)

        def done_only() -> None:
            done.record()

        out_fns["gin+zout"] = lambda: (g_in.replay(), zout())
        out_fns["gio"] = lambda: (g_io.replay(), done_only())
        out_fns["tiny+replay+zout"] = lambda: (tiny.replay(), graph.replay(), zout())
    except Exception as e:  # report it and measure the rest
        print(f"zero-copy variants skipped: {type(e).__name__}: {e}")
    return out_fns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
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
    eng = Engine(
        args.model,
        load_format=args.load_format,
        max_num_seqs=max_bs,
        cuda_graph_max_bs=max_bs,
        cuda_graph_batch_sizes=sorted(args.batch_sizes),
        max_model_len=max(2048, args.context_len + 16),
        show_progress=False,
    )
    bench = DecodeBench(eng, args.context_len)
    dev = eng.runner.device
    header = run_header("step_handoff", args.model, eng, None)
    rows = []
    for bs in args.batch_sizes:
        fns = variants(bench, bs)
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                samples[name].append(time_ms(fn, args.iters, dev))
        base = summarize(samples["replay"])["median"]
        print(f"\nbs={bs}, ctx {args.context_len}: ms per step, median [min-max] of {args.repeats}")
        for name, vals in samples.items():
            s = summarize(vals)
            extra_us = (s["median"] - base) * 1e3
            rows.append({"bs": bs, "variant": name, "ms": s, "extra_us": extra_us})
            print(
                f"  {name:<30} {s['median']:.4f} [{s['min']:.4f}-{s['max']:.4f}]  "
                f"{s['median'] / base:.4f}x replay, {extra_us:+.1f} us"
            )
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    eng.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
