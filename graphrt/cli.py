"""``python -m graphrt``: generate with the default (or a given) model from the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from graphrt.config import EngineConfig
from graphrt.engine import Engine
from graphrt.sampling_params import SamplingParams

DEFAULT_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain in one sentence what a CUDA graph is.",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m graphrt",
        description="Generate text with graphrt. With no prompt it asks the default chat model "
        "a few questions. Every engine setting is a flag.",
    )
    p.add_argument("prompts", nargs="*", help="prompts (chat messages unless --raw)")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    EngineConfig.add_cli_args(p.add_argument_group("engine"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    engine = Engine.from_config(EngineConfig.from_cli_args(args), show_progress=not args.quiet)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
    )
    questions = args.prompts or DEFAULT_QUESTIONS
    tok = engine.tokenizer
    if tok is None:
        print("this model has no tokenizer; use the Python API with token ids", file=sys.stderr)
        return 2
    prompts = (
        [tok.encode(q) for q in questions]
        if args.raw
        else [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    )
    t0 = time.perf_counter()
    if args.stream:
        n_tokens = 0
        for q, prompt in zip(questions, prompts):
            print(f"\n>>> {q}\n", flush=True)
            for out in engine.stream(prompt, params):
                print(out.outputs[0].delta_text, end="", flush=True)
                n_tokens += len(out.outputs[0].delta_token_ids)
            print()
    else:
        outs = engine.generate(prompts, params)
        n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        for q, out in zip(questions, outs):
            print(f"\n>>> {q}\n{out.outputs[0].text.strip()}")
    dt = time.perf_counter() - t0
    s = engine.runner.settings
    print(
        f"\n[graphrt] {n_tokens} tokens in {dt:.2f}s ({n_tokens / dt:.1f} tok/s) on {s.device}, "
        f"{str(s.dtype).removeprefix('torch.')}, attention={s.attention_backend}, "
        f"{engine.stats['graph_steps']} decode and {engine.stats['mixed_graph_steps']} prefill "
        f"of {engine.stats['steps']} steps through graph buckets "
        f"({'CUDA graphs' if engine.runner.graphs.captured else 'eager: no CUDA graphs'})"
    )
    engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
