"""Structured outputs against the same batch unconstrained, side by side in one run.

    python benchmarks/structured_outputs.py --model benchmarks/models/llama-3.2-1b \\
        --load-format dummy --tokenizer DIR --batch-size 64

``--batch-size`` requests at once, each with a random ``--prompt-len``-token prompt and
``--output-len`` output tokens, sampled at ``--temperature`` (default 1): once with every row
constrained by a JSON schema whose shortest instance is longer than the output (an array of at least
``--output-len`` integers), so every step of every row is masked, and once unconstrained
(``ignore_eos``). Repetitions alternate the two. Grammars do not need real weights to be
enforced: dummy weights and any tokenizer with the model's vocabulary or a smaller one will do.

Reports output tok/s of both (the unconstrained run is the ceiling), their ratio, and the host
time the engine spent filling token masks per constrained step (``Engine.stats``).
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

from graphrt import Engine, SamplingParams, StructuredOutputsParams
from graphrt.measure import fmt_stat, run_header, summarize


def schema_for(output_len: int) -> dict[str, Any]:
    """An array of at least ``output_len`` small integers: no instance fits in the output, so
    the grammar constrains every token up to ``max_tokens``."""
    item = {"type": "integer", "minimum": 0, "maximum": 999}
    return {"type": "array", "items": item, "minItems": output_len}


def run(eng: Engine, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    """One batch to the end: output tok/s over the wall time, and the mask work it caused."""
    steps0, mask0 = eng.stats["grammar_mask_steps"], eng.stats["grammar_mask_s"]
    split0 = eng.stats["split_steps"]
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    wall = time.perf_counter() - t0
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = eng.stats["grammar_mask_steps"] - steps0
    mask_s = eng.stats["grammar_mask_s"] - mask0
    return {
        "output_tok_s": tokens / wall,
        "wall_s": wall,
        "output_tokens": tokens,
        "mask_steps": steps,
        "split_steps": eng.stats["split_steps"] - split0,
        "mask_ms_per_step": mask_s / steps * 1e3 if steps else 0.0,
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
    so = StructuredOutputsParams(json=schema_for(args.output_len))
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
    res["runs"] = runs
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
            f"{m:<14} output tok/s {fmt_stat(s['output_tok_s'], ',.0f')}  mask fill "
            f"{fmt_stat(s['mask_ms_per_step'], '.3f')} ms/step over "
            f"{s['mask_steps']['median']:.0f} steps ({s['split_steps']['median']:.0f} split)"
        )
    print(f"constrained / unconstrained (the ceiling): {fmt_stat(ratio, '.3f')}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    eng.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
