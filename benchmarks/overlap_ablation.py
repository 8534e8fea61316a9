"""Overlap ablation: does the one-step-ahead scheduler hide its CPU work under the GPU?

For each batch size and overlap mode it decodes ``--steps`` steady-state steps of ``B``
requests and reports, beside the ceiling (back-to-back replays of the same bucket's graph with
no scheduling, at the measured steps' mean KV length):

- decode tok/s and the step time (period between step ends on the GPU timeline);
- overhead ratio = step time / back-to-back replay time (1.00: scheduling fully hidden);
- GPU idle fraction = gaps between one step's end and the next one's start, over the window;
- per-step CPU time of the scheduler (planning + processing) and of the launcher.

Modes are interleaved within each repetition so drift hits them alike. Medians and min–max
spreads over ``--repeats`` repetitions. ``thread`` vs ``two_events`` settles SGLang #4790's
question (one ``copy_done`` wait per step vs also waiting on ``launch_done``).

    python benchmarks/overlap_ablation.py --model benchmarks/models/llama-3.2-1b \\
        --load-format dummy --batch-sizes 1 8 64 256 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # benchmarks/ is not a package; harness puts the checkout on sys.path too

from graphrt import Engine, SamplingParams
from graphrt.measure import (
    DecodeBench,
    GcPauses,
    fmt_stat,
    measure_hbm_bandwidth,
    run_until_idle,
    step_window,
    summarize,
    time_ms,
)
from graphrt.overlap import StepProfiler
from graphrt.sampling import GREEDY

MODES = ["thread", "inline", "off", "two_events"]


def run_once(
    eng: Engine,
    mode: str,
    bs: int,
    prompt_len: int,
    warm: int,
    steps: int,
    seed: int,
    stream: bool = True,
) -> dict:
    """One measured decode run of ``bs`` requests in ``mode``; ``stream``: every request
    reports every step (as the server's streams do), else only when done (``generate``)."""
    eng.set_overlap(mode)
    prof = StepProfiler(eng.runner.device)
    eng.set_profiler(prof)
    g = torch.Generator().manual_seed(seed)
    vocab = eng.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(bs)]
    params = SamplingParams(temperature=0, max_tokens=warm + steps + 2, ignore_eos=True)
    for p in prompts:
        eng.add_request(None, p, params, stream=stream)
    with GcPauses() as gcp:
        processed_at = run_until_idle(eng, prof.records)
    eng.set_profiler(None)
    if eng.runner.device.type == "cuda":
        torch.cuda.synchronize()
    recs = [r for _, r in sorted(prof.records.items()) if r.is_decode and r.batch_size == bs]
    window = recs[warm : warm + steps]
    if len(window) < 3:
        raise RuntimeError(f"only {len(window)} steady decode steps at bs={bs}")
    # Late launches (the GPU waited for the host) are what ``gpu_idle`` below cannot see: a
    # step's start event is recorded before the launch's own CPU work. ``step_p50_ms`` is the
    # typical period beside the mean: a mean well above it is a few long steps (the host
    # stalled), one close to it is every step slower.
    out = step_window(window)
    # Collections during the whole run (prefill included): a full one over a large heap stalls
    # the step loop for tens of ms, a repetition's mean step with it.
    out |= {"gc_ms": gcp.total_ms, "gc_max_ms": gcp.max_ms, "gc_full": gcp.full}
    out["graph_bs"] = window[0].graph_bs
    if window[0].end is not None:
        span = window[0].end.elapsed_time(window[-1].end)
        out["step_ms"] = span / (len(window) - 1)
        periods = [a.end.elapsed_time(b.end) for a, b in itertools.pairwise(window)]
        # Steps that also update the page table (every page_size steps here, for all rows at
        # once, as every prompt has the same length) against the others.
        paged = [p for p, r in zip(periods, window[1:]) if r.page_updates]
        plain = [p for p, r in zip(periods, window[1:]) if not r.page_updates]
        out["paged_steps"] = len(paged) / len(periods)
        out["paged_step_ms"] = statistics.fmean(paged) if paged else None
        out["plain_step_ms"] = statistics.fmean(plain) if plain else None
        gaps = [max(0.0, a.end.elapsed_time(b.start)) for a, b in itertools.pairwise(window)]
        total = window[0].start.elapsed_time(window[-1].end)
        out["gpu_idle"] = sum(gaps) / total if total > 0 else None
    else:
        t = [processed_at[r.step_id] for r in window]
        out["step_ms"] = (t[-1] - t[0]) / (len(t) - 1) * 1e3
        out["step_p50_ms"] = statistics.median(b - a for a, b in itertools.pairwise(t)) * 1e3
        out["paged_steps"] = out["paged_step_ms"] = out["plain_step_ms"] = None
        out["gpu_idle"] = None
    out["tok_s"] = bs / out["step_ms"] * 1e3
    # What the measured steps' attention read: the ceilings replay at this context, not at one
    # guessed from the step counts (the prefill's chunks leave rows a few tokens apart).
    out["mean_kv_len"] = statistics.fmean(r.mean_kv_len for r in window[1:])
    return out


def handoff_ceilings_ms(eng: Engine, bs: int, ctx: int, iters: int) -> dict[str, float]:
    """Far ahead of the GPU (the host out of the loop), at context ``ctx``:

    - ``step``: the bucket's graph with what the launcher enqueues after it (``copy_done``):
      its excess over the replay is what the hand-offs cost on the GPU;
    - ``decode_alone``: the decode step captured without the graph's ring load and store (the
      graph before the ring), replayed on inputs already on the device;
    - ``before``: that graph with the copies the engine enqueued around it before the ring."""
    from step_handoff import variants

    graphs = eng.runner.graphs
    bucket = graphs.bucket_for(bs) if graphs is not None else None
    if bucket is None or (bucket, GREEDY) not in graphs.graphs:
        return {}
    fns = variants(DecodeBench(eng, ctx), bucket)
    keys = {
        "step": "step",
        "decode_alone": "decode alone",
        "before": "decode alone, copies (before)",
    }
    return {
        k: statistics.median(time_ms(fns[v], iters, eng.runner.device) for _ in range(3))
        for k, v in keys.items()
    }


def replay_ceiling_ms(eng: Engine, bs: int, ctx: int, iters: int) -> float | None:
    """Back-to-back replays of the bucket that serves ``bs`` rows, at context ``ctx``."""
    graphs = eng.runner.graphs
    bucket = graphs.bucket_for(bs)
    if bucket is None or (bucket, GREEDY) not in graphs.graphs:
        return None
    bench = DecodeBench(eng, ctx)
    gpu_ms, _ = bench.replay(bucket, iters)
    return gpu_ms


def engine_state_ceilings(
    eng: Engine, bs: int, prompt_len: int, kv_len: float, iters: int
) -> dict[str, float | None]:
    """Ceilings on the engine's own state: ``bs`` requests prefilled and decoded until the last
    launched step's rows hold ``kv_len`` tokens of KV on average (kept running), then, back to
    back and far ahead of the GPU:

    - ``replay``: the bucket's graph on the inputs of the engine's last step (its slots,
      lengths and page table, pages where the engine's allocator put them);
    - ``execute``: the engine's last plain decode step again, as the launcher runs it
      (``runner.execute``: the plan into a ring slot, the replay; then an event);
    - ``execute_pages``: the same for the last decode step that also updated the page table.

    The engine decodes in ``off`` mode here, so no step is left in flight holding a ring slot.
    Every call repeats the same step (same positions, same pages), so it changes nothing. An
    engine period above ``execute`` is the host's pacing; ``execute`` above ``replay`` is the
    GPU work around the graph. The requests are aborted after."""
    out: dict[str, float | None] = {
        "replay": None,
        "replay_uniform": None,
        "execute": None,
        "execute_pages": None,
        "kv_len": None,
    }
    graphs = eng.runner.graphs
    bucket = graphs.bucket_for(bs) if graphs is not None else None
    if bucket is None or (bucket, GREEDY) not in graphs.graphs:
        return out
    eng.set_overlap("off")
    g = torch.Generator().manual_seed(321)
    vocab = eng.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=int(kv_len) + 1000, ignore_eos=True)
    ids = [
        eng.add_request(None, torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), params)
        for _ in range(bs)
    ]
    plans = []
    submit = eng.launcher.submit

    def recording_submit(plan):
        plans.append(plan)
        return submit(plan)

    eng.launcher.submit = recording_submit
    try:
        sched = eng.scheduler
        while sched.waiting or not all(q.prefill_done for q in sched.running):
            eng.step()
        while True:
            last = [p for p in plans if p.is_decode and p.batch_size == bs]
            if last and last[-1].seq_lens.mean() >= kv_len:
                break
            eng.step()
    finally:
        eng.launcher.submit = submit
    torch.cuda.synchronize()
    dev = eng.runner.device
    graph = graphs.graphs[(bucket, GREEDY)]
    decode = [p for p in plans if p.is_decode and p.batch_size == bs]
    graphs.io.stage_all(decode[-1].slots, decode[-1].seq_lens, bucket)
    out["replay"] = statistics.median(time_ms(graph.replay, iters, dev) for _ in range(3))
    out["kv_len"] = float(decode[-1].seq_lens.mean())
    # Whether the state's excess over DecodeBench's is its rows' lengths (the prefill's chunks
    # leave rows a few tokens apart): the same replay with every row at the mean length.
    last = decode[-1]
    uniform = np.full_like(last.seq_lens, round(out["kv_len"]))
    graphs.io.stage_all(last.slots, uniform, bucket)
    out["replay_uniform"] = statistics.median(time_ms(graph.replay, iters, dev) for _ in range(3))
    graphs.io.stage_all(last.slots, last.seq_lens, bucket)
    plain = [p for p in decode if not p.page_updates.shape[1]]
    paged = [p for p in decode if p.page_updates.shape[1]]
    runner = eng.runner
    slots = graphs.io.slots
    # As far ahead as the engine can be: a ring slot is refilled only once the step that used
    # it last has finished (the engine's leases), so the host never writes a slot the GPU has
    # yet to read. (Since the column-major ring, the plain step here has come out 48-63 us
    # above the state's replay, paced or not, while live steps do not; not explained.)
    done = [torch.cuda.Event() for _ in range(slots)]
    for key, cands in (("execute", plain), ("execute_pages", paged)):
        if not cands:
            continue
        plan = cands[-1]

        def step(plan=plan) -> None:
            ev = done[graphs.io.next % slots]
            ev.synchronize()
            res = runner.execute(plan)
            ev.record()
            res.io.release()

        out[key] = statistics.median(time_ms(step, iters, dev) for _ in range(3))
    torch.cuda.synchronize()
    for rid in ids:
        eng.abort(rid)
    run_until_idle(eng, {})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The engine's flags (--no-pdl, --no-enable-prefix-caching, --no-text-thread,
    # --no-gc-freeze, ...); the batch sizes, buckets and token budget are the benchmark's.
    harness.add_engine_args(p, max_model_len=2048)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval in seconds (Python's default 0.005): how long a thread that "
        "wants the GIL waits before the holder is asked to drop it",
    )
    p.add_argument(
        "--state-ceiling",
        action="store_true",
        help="also time, on the engine's own state after a real decode, the graph replayed "
        "(run P2: within 0.5%% of the first ceiling) and the engine's last decode step "
        "repeated far ahead, with and without page-table updates",
    )
    p.add_argument(
        "--final-only",
        action="store_true",
        help="requests report only when done, as Engine.generate's (default: every request "
        "streams, an output per row per step, as the server's)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    max_bs = max(args.batch_sizes)
    eng = harness.build_engine(
        args,
        max_num_seqs=max_bs,
        cuda_graph_max_bs=max_bs,
        max_num_batched_tokens=max(2048, max_bs * args.prompt_len // 4),
    )
    r = eng.runner
    dev = torch.cuda.get_device_name() if r.device.type == "cuda" else "cpu"
    bw = measure_hbm_bandwidth(r.device) if r.device.type == "cuda" else None
    results, contexts = [], {}
    for bs in args.batch_sizes:
        ceiling = state_ceiling = None
        handoff: dict[str, float] = {}
        state: dict[str, float | None] = {}
        runs: dict[str, list[dict]] = {m: [] for m in args.modes}
        for rep in range(args.repeats):
            for i, mode in enumerate(args.modes):
                # Prompts of their own per mode and repetition: with the same prompts, a mode
                # after the first found them all in the prefix cache, admitted every row in one
                # step, and so updated the page table on a sixteenth of its steps where the
                # first mode's rows, admitted in four chunks, did on a third (s25b: 6% against
                # 36% at batch 256).
                runs[mode].append(
                    run_once(
                        eng,
                        mode,
                        bs,
                        args.prompt_len,
                        args.warmup_steps,
                        args.steps,
                        seed=rep * len(args.modes) + i,
                        stream=not args.final_only,
                    )
                )
            # The ceilings replay at the context the measured steps had (the mean KV length of
            # their rows; every repetition schedules the same steps): attention's work grows by
            # a row's KV per token, 0.14% of the step per token at 1B batch 256.
            kv = statistics.median(runs[m][-1]["mean_kv_len"] for m in args.modes)
            ctx = round(kv)
            if ceiling is None:
                contexts[bs] = ctx
                ceiling = replay_ceiling_ms(eng, bs, ctx, iters=50)
                if r.device.type == "cuda":
                    handoff = handoff_ceilings_ms(eng, bs, ctx, iters=50)
                if r.device.type == "cuda" and args.state_ceiling:
                    state = engine_state_ceilings(eng, bs, args.prompt_len, kv, iters=50)
                    state_ceiling = state.get("replay")
            # The GPU's own speed drifts by a few percent over a run (clocks, power), so each
            # repetition also gets a ceiling measured right after it.
            near = replay_ceiling_ms(eng, bs, ctx, iters=20)
            for mode in args.modes:
                runs[mode][-1]["near_ceiling_ms"] = near
        for mode in args.modes:
            row = {
                "bs": bs,
                "mode": mode,
                "ceiling_ms": ceiling,
                "engine_state_ceiling_ms": state_ceiling,
                "engine_execute_ms": state.get("execute"),
                "engine_execute_pages_ms": state.get("execute_pages"),
                "engine_state_kv_len": state.get("kv_len"),
                "engine_state_uniform_ms": state.get("replay_uniform"),
                "context_at_ceiling": contexts[bs],
                "handoff_ceiling_ms": handoff.get("step"),
                "decode_alone_ms": handoff.get("decode_alone"),
                "before_ring_ms": handoff.get("before"),
                "repeats": len(runs[mode]),
            }
            for key in (
                "step_ms",
                "tok_s",
                "gpu_idle",
                "schedule_ms",
                "process_ms",
                "text_ms",
                "gc_ms",
                "gc_max_ms",
                "gc_full",
                "wait_ms",
                "launch_ms",
                "late_steps",
                "yielded_steps",
                "step_p50_ms",
                "paged_steps",
                "paged_step_ms",
                "plain_step_ms",
                "mean_kv_len",
            ):
                row[key] = summarize([x[key] for x in runs[mode]])
            row["overhead_ratio"] = summarize(
                [x["step_ms"] / ceiling if ceiling else None for x in runs[mode]]
            )
            row["ratio_to_engine_state"] = summarize(
                [x["step_ms"] / state_ceiling if state_ceiling else None for x in runs[mode]]
            )
            row["ratio_to_adjacent_replay"] = summarize(
                [
                    x["step_ms"] / x["near_ceiling_ms"] if x["near_ceiling_ms"] else None
                    for x in runs[mode]
                ]
            )
            step_far = handoff.get("step")
            row["ratio_to_handoff"] = summarize(
                [x["step_ms"] / step_far if step_far else None for x in runs[mode]]
            )
            # The ceiling's graph now holds its own input load and ids store; the decode step
            # without them, for comparison with runs before the ring.
            alone = handoff.get("decode_alone")
            row["ratio_to_decode_alone"] = summarize(
                [x["step_ms"] / alone if alone else None for x in runs[mode]]
            )
            row["graph_bs"] = runs[mode][0]["graph_bs"]
            results.append(row)
            print_row(row)
    seed = seed_question(results)
    header = {
        "model": str(eng.model_dir),
        "device": dev,
        "hbm_bytes_per_s": bw,
        "weight_bytes": r.weight_bytes,
        "step_weight_bytes": r.step_weight_bytes,
        "attention_backend": r.settings.attention_backend,
        "dtype": str(r.settings.dtype),
        "prompt_len": args.prompt_len,
        "pdl": args.pdl,
        "prefix_caching": args.enable_prefix_caching,
        "switch_interval_s": sys.getswitchinterval(),
        "text_thread": args.text_thread,
        "gc_freeze": args.gc_freeze,
        "stream": not args.final_only,
        "steps": args.steps,
        "context_at_ceiling": contexts,
    }
    cache = "on" if args.enable_prefix_caching else "off"
    print(
        f"\n{dev}, {eng.model_dir}, attention={r.settings.attention_backend}, "
        f"prefix cache {cache}, "
        f"text side on {'its own thread' if args.text_thread else 'the step thread'}, gc freeze "
        f"{'on' if args.gc_freeze else 'off'}"
    )
    if bw:
        print(f"HBM bandwidth (this run): {bw / 1e12:.2f} TB/s")
    for line in seed["lines"]:
        print(line)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "header": header,
                    "rows": results,
                    "seed_question": seed["rows"],
                },
                indent=2,
            )
        )
    eng.shutdown()
    return 0


def print_row(row: dict) -> None:
    ceil = f"{row['ceiling_ms']:.3f}" if row["ceiling_ms"] else "-"
    state = row.get("engine_state_ceiling_ms")
    vs_state = ""
    if state:
        vs_state = (
            f" | on the engine's state (KV {row['engine_state_kv_len']:.1f}): replay {state:.3f} ms"
        )
        for key, label in (
            ("engine_state_uniform_ms", "at uniform lengths"),
            ("engine_execute_ms", "step far ahead"),
            ("engine_execute_pages_ms", "paged far ahead"),
        ):
            if row.get(key):
                vs_state += f", {label} {row[key]:.3f} ms"
        vs_state += f", ratio {fmt_stat(row['ratio_to_engine_state'])}"
    print(
        f"bs={row['bs']:<4} {row['mode']:<10} step {fmt_stat(row['step_ms'])} ms | "
        f"ceiling {ceil} ms"
        f" (KV {row['context_at_ceiling']})"
        f" | ratio {fmt_stat(row['overhead_ratio'])}{vs_state} | "
        f"tok/s {fmt_stat(row['tok_s'], '.0f')}"
        " | idle "
        f"{fmt_stat(row['gpu_idle'], '.1f', 100)}% | sched {fmt_stat(row['schedule_ms'])} + proc "
        f"{fmt_stat(row['process_ms'])} + text {fmt_stat(row['text_ms'])} ms | "
        f"wait {fmt_stat(row['wait_ms'])} | "
        f"launch {fmt_stat(row['launch_ms'])} ms | gc {fmt_stat(row['gc_ms'], '.1f')} ms, longest "
        f"{fmt_stat(row['gc_max_ms'], '.1f')}, full {fmt_stat(row['gc_full'], '.0f')}",
        flush=True,
    )
    handoff = row.get("handoff_ceiling_ms")
    if handoff and row["ceiling_ms"]:
        print(
            f"  the step far ahead (graph + copy_done): {handoff:.3f} ms ("
            f"{handoff / row['ceiling_ms']:.4f}x the replay); step / that "
            f"{fmt_stat(row['ratio_to_handoff'])}"
            f" | decode alone (no ring load/store) {row['decode_alone_ms']:.3f} ms, ratio to it "
            f"{fmt_stat(row['ratio_to_decode_alone'])}; with the copies before the ring, far ahead "
            f"{row['before_ring_ms']:.3f} ms"
            " | launched after the step before had ended: "
            f"{fmt_stat(row['late_steps'], '.0f', 100)}%"
            f" of steps (launch waited for: {fmt_stat(row['yielded_steps'], '.0f', 100)}%) | ratio "
            f"to a replay right before each repetition {fmt_stat(row['ratio_to_adjacent_replay'])}"
            f" | median step {fmt_stat(row['step_p50_ms'])} ms; mean of steps without page "
            f"updates {fmt_stat(row['plain_step_ms'])}, with {fmt_stat(row['paged_step_ms'])} ms "
            f"({fmt_stat(row['paged_steps'], '.0f', 100)}% of steps)",
            flush=True,
        )


def seed_question(rows: list[dict]) -> dict:
    """thread (one copy_done per step) vs two_events (also launch_done), per batch size."""
    by = {(r["bs"], r["mode"]): r for r in rows}
    out, lines = [], ["one copy_done (thread) vs two events (two_events), decode tok/s:"]
    for bs in sorted({r["bs"] for r in rows}):
        a, b = by.get((bs, "thread")), by.get((bs, "two_events"))
        if not a or not b or a["tok_s"]["median"] is None:
            continue
        ratio = a["tok_s"]["median"] / b["tok_s"]["median"]
        out.append({"bs": bs, "thread": a["tok_s"], "two_events": b["tok_s"], "ratio": ratio})
        lines.append(
            f"  bs={bs}: thread {fmt_stat(a['tok_s'], '.0f')} vs two_events "
            f"{fmt_stat(b['tok_s'], '.0f')}  ratio {ratio:.3f}"
        )
    return {"rows": out, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
