"""Where a decode step's GPU time goes: a kernel-by-kernel profile of one captured step.

For each batch size it replays the bucket's CUDA graph (and runs the same step eagerly) under
``torch.profiler`` and groups the GPU kernels by name: calls and microseconds per step, and each
group's share. It also reports

- **wall**: the replay's step time from CUDA events, without the profiler;
- **kernel sum**: the summed kernel durations per step; ``wall - kernel sum`` is time the GPU
  spends between kernels (launch gaps, dependency drains) inside the graph;
- **ideal**: the step's bytes (weights + KV read) at the HBM bandwidth measured in this run.

With programmatic dependent launch (the default on an H100) a kernel starts before the one
before it ends and parks in its wait, so durations overlap, include that wait, and sum to more
than the wall time; the table says so. Profile with ``--no-pdl`` to attribute time per kernel.

So a missed MBU target splits into "kernels below bandwidth" (which kernels, by how much) and
"gaps between kernels" (how many launches). This is the profile issue 7 asks for when a target is
missed.

    python benchmarks/step_profile.py --model benchmarks/models/llama-3.2-1b --load-format dummy \\
        --batch-sizes 1 64 256 --json step_profile.json

GPU only: without CUDA it says so and exits 0 (there are no kernels to time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # benchmarks/ is not a package; harness puts the checkout on sys.path too

from graphrt.measure import DecodeBench, measure_hbm_bandwidth, time_ms
from graphrt.sampling import GREEDY, SampleOutputs

# Long kernel names (templated CUTLASS/cuBLAS, Triton's mangled ones) collapse to a readable
# family so that one GEMM shape shows as one row per distinct kernel.
_SHORTEN = [
    (re.compile(r"^(_[a-z0-9_]+?_kernel)(?:_[0-9][0-9a-z]*)?$"), r"\1"),
    (re.compile(r"^void cutlass::Kernel2?<([A-Za-z0-9_]+).*"), r"\1"),
    (re.compile(r"^void at::native::(?:\(anonymous namespace\)::)?([A-Za-z_]+)<.*"), r"at::\1"),
    (re.compile(r"^void ([A-Za-z_0-9:]+)<.*"), r"\1"),
]


def short_name(name: str) -> str:
    """A readable kernel family name, at most 90 characters."""
    for pat, rep in _SHORTEN:
        if pat.match(name):
            name = pat.sub(rep, name)
            break
    return name[:90]


def gpu_events(prof) -> list[tuple[str, float, float]]:
    """``(name, start us, duration us)`` of every GPU kernel and copy in a torch.profiler run,
    names shortened to their family (copies to their kind, e.g. ``Memcpy HtoD``)."""
    out = []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA or ev.device_time <= 0:
            continue
        name = short_name(ev.name)
        if name.startswith(("Memcpy", "Memset")) and " " in name:
            name = " ".join(name.split(" ")[:2])
        out.append((name, ev.time_range.start, ev.device_time))
    return out


def group_events(events: list[tuple[str, float, float]], steps: int) -> dict[str, Any]:
    """Events grouped by name: calls and microseconds per step, and each group's share."""
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, _, dur in events:
        groups[name][0] += 1
        groups[name][1] += dur
    total = sum(t for _, t in groups.values())
    rows = [
        {"kernel": k, "calls": c / steps, "us": t / steps, "share": t / total if total else 0.0}
        for k, (c, t) in groups.items()
    ]
    rows.sort(key=lambda r: -r["us"])
    return {"kernels": rows, "kernel_us": total / steps, "launches": sum(r["calls"] for r in rows)}


def span_us(events: list[tuple[str, float, float]]) -> float:
    """From the first event's start to the last one's end."""
    return max(a + d for _, a, d in events) - min(a for _, a, _ in events)


def busy_us(events: list[tuple[str, float, float]]) -> float:
    """Length of the union of the events' intervals: time the GPU had work (PDL kernels and
    copies overlap, so their durations sum to more)."""
    busy, end = 0.0, float("-inf")
    for _, a, dur in sorted(events, key=lambda x: x[1]):
        b = a + dur
        if a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy


def gap_table(events: list[tuple[str, float, float]], steps: int) -> dict[str, Any]:
    """Where the GPU had no work inside the events' span: every gap between the end of all work
    so far and the next op's start, summed per step by the pair of ops around it (``a -> b``).
    A pair that only the engine's step has (a copy before the graph, the graph's last kernel
    before the id copy) says which hand-off the time goes to."""
    pairs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    end, last = float("-inf"), ""
    for name, a, dur in sorted(events, key=lambda x: x[1]):
        if a > end and last:
            pairs[(last, name)][0] += 1
            pairs[(last, name)][1] += a - end
        if a + dur > end:
            end, last = a + dur, name
    rows = [
        {"before": k[0], "after": k[1], "count": c / steps, "us": t / steps}
        for k, (c, t) in pairs.items()
    ]
    rows.sort(key=lambda r: -r["us"])
    return {"gap_us": sum(r["us"] for r in rows), "pairs": rows}


def profile_events(fn, steps: int) -> list[tuple[str, float, float]]:
    """GPU events (``gpu_events``) of ``steps`` calls of ``fn`` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return gpu_events(prof)


def kernel_table(fn, steps: int) -> dict[str, Any]:
    """Profile ``steps`` calls of ``fn``; kernels grouped by name, per step."""
    return group_events(profile_events(fn, steps), steps)


def profile_bs(bench: DecodeBench, bs: int, steps: int, bw: float) -> dict[str, Any]:
    r = bench.r
    s, pos, seq = bench.inputs(bs)
    bound = r.settings.max_pages_per_seq * r.config.page_size
    host = bench.seq_lens[:bs]
    out = SampleOutputs.allocate(bs, r.max_logprobs, r.device)

    def eager() -> None:
        r.decode_forward(s, pos, seq, out, GREEDY, bound, seq_lens_host=host)

    res: dict[str, Any] = {"batch_size": bs}
    if r.graphs is not None and (bs, GREEDY) in r.graphs.graphs:
        _, issue_us = bench.replay(bs, 50)
        graph = r.graphs.graphs[(bs, GREEDY)]
        res["replay_ms"] = statistics.median(time_ms(graph.replay, 50, r.device) for _ in range(5))
        res["replay_issue_us"] = issue_us
        res["graph"] = kernel_table(graph.replay, steps)
    with torch.inference_mode():
        res["eager_ms"] = time_ms(eager, 20, r.device)
        res["eager"] = kernel_table(eager, steps)
    nbytes = bench.bytes_per_step(bs)
    res["bytes"] = nbytes
    res["ideal_ms"] = nbytes / bw * 1e3
    return res


def render(res: dict[str, Any], top: int) -> str:
    lines = []
    for row in res["results"]:
        bs = row["batch_size"]
        g = row.get("graph") or row["eager"]
        wall = row.get("replay_ms", row["eager_ms"])
        kind = "graph replay" if "graph" in row else "eager"
        lines.append(
            f"\n## bs {bs} ({kind}): wall {wall * 1e3:.1f} us, kernel sum {g['kernel_us']:.1f} us, "
            f"gaps {wall * 1e3 - g['kernel_us']:.1f} us over {g['launches']:.0f} launches, "
            f"ideal {row['ideal_ms'] * 1e3:.1f} us (MBU {row['ideal_ms'] / wall:.1%}); "
            f"eager {row['eager_ms'] * 1e3:.1f} us"
        )
        if g["kernel_us"] > wall * 1e3:
            lines.append(
                "\nKernels overlap (PDL): durations include time parked in the PDL wait and sum "
                "past the wall time; run with --no-pdl to attribute time per kernel."
            )
        lines.append("| kernel | calls/step | us/step | share |\n|---|---:|---:|---:|")
        for k in g["kernels"][:top]:
            lines.append(f"| {k['kernel']} | {k['calls']:.0f} | {k['us']:.1f} | {k['share']:.1%} |")
        rest = g["kernels"][top:]
        if rest:
            us = sum(k["us"] for k in rest)
            calls = sum(k["calls"] for k in rest)
            lines.append(f"| ({len(rest)} others) | {calls:.0f} | {us:.1f} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_engine_args(p)  # the batch sizes, buckets and context are the benchmark's
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="profiled steps per batch size")
    p.add_argument("--top", type=int, default=14, help="kernel rows shown per batch size")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_profile: no CUDA device; a kernel profile needs a GPU.")
        return 0
    max_bs = max(args.batch_sizes)
    eng = harness.build_engine(
        args,
        max_num_seqs=max_bs,
        cuda_graph_max_bs=max_bs,
        cuda_graph_batch_sizes=tuple(sorted(set(args.batch_sizes))),
        max_model_len=-(-(args.context_len + 64) // 64) * 64,
    )
    try:
        bw = measure_hbm_bandwidth(eng.runner.device)
        bench = DecodeBench(eng, args.context_len)
        out = {
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(),
            "model": str(eng.model_dir),
            "attention_backend": eng.runner.attn.name,
            "context_len": args.context_len,
            "hbm_bytes_per_s": bw,
            "weight_bytes": eng.runner.weight_bytes,
            "step_weight_bytes": eng.runner.step_weight_bytes,
            "results": [],
        }
        for bs in args.batch_sizes:
            out["results"].append(profile_bs(bench, bs, args.steps, bw))
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"# step profile: {out['model']}, {out['device']}, HBM {bw / 1e12:.2f} TB/s, "
              f"backend {out['attention_backend']}, context {args.context_len}")  # fmt: skip
        print(render(out, args.top))
    finally:
        eng.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
