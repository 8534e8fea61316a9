"""Structured outputs against the same batch unconstrained, side by side in one run.

    python benchmarks/structured_outputs.py --model benchmarks/models/llama-3.2-1b \\
        --load-format dummy --tokenizer DIR --batch-size 64

``--batch-size`` requests at once, each with a random ``--prompt-len``-token prompt and
``--output-len`` output tokens, sampled at ``--temperature`` (default 1): once with every row
constrained by a JSON schema whose shortest instance is longer than the output, so every step of
every row is masked, and once unconstrained (``ignore_eos``). ``--schema`` picks it: ``ints``, an
array of at least ``--output-len`` integers; ``records``, an array of as many objects with
strings, an integer, an enum and a nested array (strings make xgrammar's masks costlier).
Repetitions alternate the two. Grammars do not need real weights to be enforced: dummy weights
and any tokenizer with the model's vocabulary or a smaller one will do.

Reports output tok/s of both (the unconstrained run is the ceiling), their ratio, and the host
time the engine spent per constrained step advancing the grammars and filling the token masks
(``Engine.stats``). ``--host-sweep`` first times that host work alone, for ``--batch-size``
grammars walking random allowed tokens, at each of ``--grammar-threads-sweep`` thread counts:
what ``grammar_threads`` should be on this host (``--host-only``: that and nothing else).
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
import numpy as np

from graphrt import Engine, SamplingParams, StructuredOutputsParams
from graphrt.measure import fmt_stat, run_header, step_window, summarize
from graphrt.overlap import StepProfiler
from graphrt.structured_outputs import StructuredOutputs

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "tags"],
}


def schema_for(output_len: int, kind: str = "ints") -> dict[str, Any]:
    """An array of at least ``output_len`` items (small integers, or records): no instance fits
    in the output, so the grammar constrains every token up to ``max_tokens``."""
    item = {"type": "integer", "minimum": 0, "maximum": 999} if kind == "ints" else RECORD
    return {"type": "array", "items": item, "minItems": output_len}


def host_sweep(
    eng: Engine, so: StructuredOutputsParams, rows: int, threads: list[int], steps: int = 64
) -> dict[int, dict[str, Any]]:
    """Per step, the host time to advance ``rows`` grammars one token and fill their masks, at
    each thread count: the work a split step must finish inside its forward."""
    vocab = eng.model_config.vocab_size
    rng = np.random.default_rng(0)
    out = {}
    for t in threads:
        eos = eng.tokenizer.eos_token_ids | set(eng.model_config.eos_token_ids)
        svc = StructuredOutputs(
            eng.tokenizer.hf, vocab, eos, mask_threads=t, json_whitespace=eng.config.json_whitespace
        )
        fut = svc.start(so)
        fut.result()
        states = [svc.matcher_state(fut) for _ in range(rows)]
        for st in states:
            svc.poll(st)
        masks = np.empty((rows, svc.words), dtype=np.int32)
        fill, accept = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            svc.fill(states, masks)
            fill.append(time.perf_counter() - t0)
            bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
            toks = [int(rng.choice(np.flatnonzero(b))) for b in bits]
            t0 = time.perf_counter()
            svc.accept(states, toks)
            accept.append(time.perf_counter() - t0)
        svc.close()
        out[t] = {
            "fill_ms": summarize(x * 1e3 for x in fill),
            "accept_ms": summarize(x * 1e3 for x in accept),
        }
    return out


def step_profile(prof: StepProfiler, batch_size: int) -> dict[str, float | None]:
    """``step_window`` over one run's full-batch decode steps (the grammars' accept is in
    ``process_ms``; the mask fill is apart, in ``mask_ms_per_step``), and ``head_ms``: the GPU
    time from the first step's start to the first full-batch decode step's end (the prompts'
    chunks, eager where they carry constrained rows, and the partial batches between them)."""
    every = [r for _, r in sorted(prof.records.items())]
    recs = [r for r in every if r.is_decode and r.batch_size == batch_size]
    if len(recs) < 3:
        return {}
    out = step_window(recs)
    first = every[0]
    out["head_ms"] = first.start.elapsed_time(recs[0].end) if first.start is not None else None
    out["head_steps"] = every.index(recs[0]) + 1
    return out


def run(
    eng: Engine, prompts: list[list[int]], params: SamplingParams, profile: bool = False
) -> dict[str, float]:
    """One batch to the end: output tok/s over the wall time, and the mask work it caused;
    with ``profile``, the per-step timings of :func:`step_profile` too (a separate run: the
    profiler's events cost a little)."""
    steps0, mask0 = eng.stats["grammar_mask_steps"], eng.stats["grammar_mask_s"]
    split0, accept0 = eng.stats["split_steps"], eng.stats["grammar_accept_s"]
    prof = StepProfiler(eng.runner.device) if profile else None
    eng.set_profiler(prof)
    t0 = time.perf_counter()
    try:
        outs = eng.generate(prompts, params)
    finally:
        eng.set_profiler(None)
    wall = time.perf_counter() - t0
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = eng.stats["grammar_mask_steps"] - steps0
    mask_s = eng.stats["grammar_mask_s"] - mask0
    accept_s = eng.stats["grammar_accept_s"] - accept0
    extra = step_profile(prof, len(prompts)) if prof is not None else {}
    return extra | {
        "output_tok_s": tokens / wall,
        "wall_s": wall,
        "output_tokens": tokens,
        "mask_steps": steps,
        "split_steps": eng.stats["split_steps"] - split0,
        "mask_ms_per_step": mask_s / steps * 1e3 if steps else 0.0,
        "accept_ms_per_step": accept_s / steps * 1e3 if steps else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--temperature", type=float, default=1.0, help="0: greedy (the lighter sampler graphs)"
    )
    p.add_argument("--schema", choices=["ints", "records"], default="ints")
    p.add_argument("--host-sweep", action="store_true", help="time the host work alone first")
    p.add_argument("--host-only", action="store_true", help="only the host sweep: no decoding")
    p.add_argument("--grammar-threads-sweep", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--profile", action="store_true", help="one more profiled run per mode: per-step times"
    )
    p.add_argument("--json", type=Path)
    harness.add_engine_args(p)
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be at least 5 (median and spread)")
    eng = harness.build_engine(args, max_num_seqs=max(args.batch_size, 1))
    rng = random.Random(0)
    vocab = len(eng.tokenizer.hf) if eng.tokenizer is not None else 1000
    prompts = [
        [rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(args.batch_size)
    ]
    base = dict(temperature=args.temperature, seed=1, max_tokens=args.output_len)
    so = StructuredOutputsParams(json=schema_for(args.output_len, args.schema))
    sweep = None
    if args.host_sweep or args.host_only:
        sweep = host_sweep(eng, so, args.batch_size, args.grammar_threads_sweep)
        for t, r in sweep.items():
            print(
                f"host, {args.batch_size} grammars ({args.schema}), {t} thread(s): fill "
                f"{fmt_stat(r['fill_ms'], '.3f')} ms, accept {fmt_stat(r['accept_ms'], '.3f')} "
                "ms per step"
            )
        if args.host_only:
            if args.json:
                res = run_header("structured_outputs", str(eng.model_dir), eng, None)
                res["settings"], res["host_sweep"] = vars(args) | {"json": None}, sweep
                args.json.write_text(json.dumps(res, indent=1, default=str))
            eng.shutdown()
            return 0
    modes = {
        "unconstrained": SamplingParams(**base, ignore_eos=True),
        "constrained": SamplingParams(**base, structured_outputs=so),
    }
    # Warm-up, not timed: kernels compile, and the grammar compiles once (cached).
    for params in modes.values():
        eng.generate(prompts[:2], params.replace(max_tokens=8))
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        order = list(modes) if rep % 2 == 0 else list(reversed(modes))
        for m in order:
            runs[m].append(run(eng, prompts, modes[m]))
    res = run_header("structured_outputs", str(eng.model_dir), eng, None)
    res["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    res["runs"], res["host_sweep"] = runs, sweep
    stats = {m: {k: summarize(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    ratio = summarize(
        c["output_tok_s"] / u["output_tok_s"]
        for c, u in zip(runs["constrained"], runs["unconstrained"])
    )
    res["stats"], res["ratio"] = stats, ratio
    print(
        f"{res['device']}, {args.batch_size} requests, prompt {args.prompt_len}, output "
        f"{args.output_len}, temperature {args.temperature:g}; median [min-max] of "
        f"{args.repeats}"
    )
    for m in modes:
        s = stats[m]
        print(
            f"{m:<14} output tok/s {fmt_stat(s['output_tok_s'], ',.0f')}  accept "
            f"{fmt_stat(s['accept_ms_per_step'], '.3f')}, mask fill "
            f"{fmt_stat(s['mask_ms_per_step'], '.3f')} ms/step over "
            f"{s['mask_steps']['median']:.0f} steps ({s['split_steps']['median']:.0f} split)"
        )
    print(f"constrained / unconstrained (the ceiling): {fmt_stat(ratio, '.3f')}")
    if args.profile:
        res["profile"] = {m: run(eng, prompts, modes[m], profile=True) for m in modes}
        for m, r in res["profile"].items():
            # A mean period above the median: a few long steps (stalls).
            cols = ("schedule", "process", "wait", "launch", "text", "step_p50", "step_mean")
            cols += ("step_max", "head")
            shown = [c for c in cols if r.get(c + "_ms") is not None]
            line = ", ".join(f"{c} {r[c + '_ms']:.3f}" for c in shown)
            if r.get("head_ms") is not None:
                line += f" ({r['head_steps']} steps to a full batch)"
            print(
                f"profiled {m:<14} per step (median, ms): {line}; mask fill "
                f"{r['mask_ms_per_step']:.3f}, accept {r['accept_ms_per_step']:.3f}; GPU waited "
                f"for the launch in {r.get('late_steps', 0.0) * 100:.0f}% of steps"
                + (
                    f", for the masks in {r['masks_late_steps'] * 100:.0f}% of split steps"
                    if r.get("masks_late_steps") is not None
                    else ""
                )
            )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    eng.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
