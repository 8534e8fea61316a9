"""``capture-profile``: what capturing each decode bucket costs and what replaying it saves,
and what each mixed (prefill) token bucket costs to capture and to replay.

For each bucket it prints capture time, graph memory, eager step time, replay step time (GPU
time from CUDA events, back-to-back replays), the CPU cost of issuing one replay (while the
previous one runs, as the engine does, and onto an idle GPU right after a synchronize), the
speedup and the memory-bandwidth utilisation (MBU) against the HBM bandwidth measured in the
same run.
Every row is a real decode step: ``bs`` rows, each with ``--context-len`` tokens of KV cache.

    capture-profile --model /path/to/llama --load-format dummy --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from graphrt.config import EngineConfig
from graphrt.engine import Engine
from graphrt.measure import DecodeBench, measure_hbm_bandwidth, time_ms
from graphrt.sampling import GREEDY


@dataclass
class BucketProfile:
    bs: int
    capture_ms: float | None
    graph_mb: float | None
    eager_ms: float
    replay_ms: float | None
    replay_issue_us: float | None  # issued while the previous step runs (the engine's case)
    replay_issue_idle_us: float | None  # issued onto an idle GPU, right after a synchronize
    speedup: float | None
    bytes_per_step: int
    mbu: float | None
    roofline_ms: float | None


# Without CUDA nothing is captured and every step is eager: a few sizes show the trend.
CPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def batch_sizes(engine: Engine) -> list[int]:
    """The batch sizes to profile: every captured bucket on CUDA, a few on CPU."""
    runner = engine.runner
    sizes = runner.graphs.buckets if runner.device.type == "cuda" else CPU_BATCH_SIZES
    return [b for b in sizes if b <= engine.config.max_num_seqs]


def profile(
    engine: Engine, ctx: int, iters: int, sizes: list[int]
) -> tuple[list[BucketProfile], float | None]:
    """Profile a decode step of each batch size in ``sizes``, ``ctx`` tokens a row."""
    r = engine.runner
    cuda = r.device.type == "cuda"
    bw = measure_hbm_bandwidth(r.device) if cuda else None
    bench = DecodeBench(engine, ctx, max(sizes))
    stats = {s.bs: s for s in r.graphs.stats}
    rows = []
    for bs in sizes:
        eager = bench.eager_ms(bs, max(3, iters // 4))
        replay_ms = issue_us = issue_idle_us = None
        if (bs, GREEDY) in r.graphs.graphs:
            replay_ms, _ = bench.replay(bs, iters)
            issue_us, issue_idle_us = bench.issue_us(bs, iters)
        nbytes = bench.bytes_per_step(bs)
        st = stats.get(bs)
        t = replay_ms if replay_ms is not None else eager
        rows.append(
            BucketProfile(
                bs=bs,
                capture_ms=st.capture_s * 1e3 if st else None,
                graph_mb=st.graph_bytes / 1e6 if st else None,
                eager_ms=eager,
                replay_ms=replay_ms,
                replay_issue_us=issue_us,
                replay_issue_idle_us=issue_idle_us,
                speedup=eager / replay_ms if replay_ms else None,
                bytes_per_step=nbytes,
                mbu=nbytes / (t / 1e3) / bw if bw else None,
                roofline_ms=nbytes / bw * 1e3 if bw else None,
            )
        )
    return rows, bw


@dataclass
class MixedBucketProfile:
    tokens: int
    rows: int
    capture_ms: float | None
    graph_mb: float | None
    # GPU time of a replay whose tokens are all padding: every dense layer over the bucket's
    # tokens, attention skipped (no row feeds a token), so no real KV page is touched.
    replay_ms: float | None


def profile_mixed(engine: Engine, iters: int) -> list[MixedBucketProfile]:
    """The mixed token buckets: capture cost, graph memory, and (on CUDA) replay GPU time."""
    mixed = engine.runner.mixed_graphs
    if mixed is None:
        return []
    stats = {s.bs: s for s in mixed.stats}
    cuda = engine.runner.device.type == "cuda"
    if cuda:
        mixed.io.stage_padding()
    rows = []
    for t in mixed.buckets:
        st = stats.get(t)
        ms = None
        if cuda and (t, GREEDY) in mixed.graphs:
            g = mixed.graphs[(t, GREEDY)]
            ms = time_ms(g.replay, iters, engine.runner.device)
        rows.append(
            MixedBucketProfile(
                tokens=t,
                rows=mixed.spec.rows_for(t),
                capture_ms=st.capture_s * 1e3 if st else None,
                graph_mb=st.graph_bytes / 1e6 if st else None,
                replay_ms=ms,
            )
        )
    return rows


def print_mixed_table(rows: list[MixedBucketProfile]) -> None:
    if not rows:
        print("mixed graphs: none (cuda_graph_max_tokens=0, or a backend that cannot capture them)")
        return
    print("mixed (prefill) token buckets; replay ms: all-padding replay, dense layers only")
    cols = ("tokens", "rows", "capture ms", "graph MB", "replay ms")
    print(" | ".join(f"{c:>11}" for c in cols))
    for r in rows:
        vals = (
            str(r.tokens),
            str(r.rows),
            _fmt(r.capture_ms, ".1f"),
            _fmt(r.graph_mb, ".1f"),
            _fmt(r.replay_ms, ".3f"),
        )
        print(" | ".join(f"{v:>11}" for v in vals))


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[BucketProfile], bw: float | None, header: str) -> None:
    print(header)
    if bw:
        print(f"HBM bandwidth (D2D copy, read+write, this run): {bw / 1e12:.2f} TB/s")
    cols = (
        "bs",
        "capture ms",
        "graph MB",
        "eager ms",
        "replay ms",
        "issue us",
        "idle issue",
        "speedup",
        "roofline ms",
        "MBU",
    )
    print(" | ".join(f"{c:>11}" for c in cols))
    for r in rows:
        vals = (
            str(r.bs),
            _fmt(r.capture_ms, ".1f"),
            _fmt(r.graph_mb, ".1f"),
            _fmt(r.eager_ms, ".3f"),
            _fmt(r.replay_ms, ".3f"),
            _fmt(r.replay_issue_us, ".1f"),
            _fmt(r.replay_issue_idle_us, ".1f"),
            _fmt(r.speedup, ".1f"),
            _fmt(r.roofline_ms, ".3f"),
            f"{r.mbu:.1%}" if r.mbu else "-",
        )
        print(" | ".join(f"{v:>11}" for v in vals))


def plot(rows: list[BucketProfile], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = [r.bs for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(bs, [r.eager_ms for r in rows], "o-", label="eager step")
    if any(r.replay_ms for r in rows):
        ax.plot(bs, [r.replay_ms for r in rows], "s-", label="graph replay")
    if any(r.roofline_ms for r in rows):
        ax.plot(bs, [r.roofline_ms for r in rows], "k--", label="HBM roofline")
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("ms per step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="capture-profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--context-len", type=int, default=128, help="KV tokens per row")
    p.add_argument("--iters", type=int, default=50, help="replays timed per bucket")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of step time vs batch")
    EngineConfig.add_cli_args(p.add_argument_group("engine"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = EngineConfig.from_cli_args(args)
    if not torch.cuda.is_available():
        print(
            "capture-profile: no CUDA device; CUDA graphs are not captured. Showing eager "
            "step times only.",
            file=sys.stderr,
        )
    engine = Engine.from_config(config)
    sizes = batch_sizes(engine)
    fit = DecodeBench.rows_that_fit(engine, args.context_len)
    pool = f"the KV pool ({engine.pages.num_usable} pages of {engine.config.page_size} tokens)"
    if not sizes or fit < min(sizes):
        print(
            f"capture-profile: {pool} holds {fit} rows of {args.context_len} tokens, fewer than "
            f"the smallest batch to profile. Lower --context-len or give the KV pool more memory.",
            file=sys.stderr,
        )
        engine.shutdown()
        return 1
    if fit < max(sizes):
        print(
            f"capture-profile: {pool} holds {fit} rows of {args.context_len} tokens: profiling "
            f"batches up to {fit}, not {max(sizes)}. Lower --context-len or give the KV pool "
            "more memory to profile larger ones.",
            file=sys.stderr,
        )
        sizes = [b for b in sizes if b <= fit]
    rows, bw = profile(engine, args.context_len, args.iters, sizes)
    r = engine.runner
    dev = torch.cuda.get_device_name() if r.device.type == "cuda" else "cpu"
    header = (
        f"capture-profile: {r.model_cfg.architecture} ({r.weight_bytes / 1e9:.2f} GB "
        f"{str(r.settings.dtype).removeprefix('torch.')}), attention={r.settings.attention_backend}"
        f", context {args.context_len} tokens/row, on {dev}"
    )
    print_table(rows, bw, header)
    mixed_rows = profile_mixed(engine, max(3, args.iters // 5))
    print_mixed_table(mixed_rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "header": header,
                    "device": dev,
                    "hbm_bytes_per_s": bw,
                    "graph_memory_bytes": r.graph_memory_bytes,
                    "context_len": args.context_len,
                    "rows": [asdict(x) for x in rows],
                    "mixed_rows": [asdict(x) for x in mixed_rows],
                },
                indent=2,
            )
        )
    if args.plot:
        plot(rows, args.plot, header.split(":", 1)[1].split(",")[0].strip() + f" on {dev}")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
