"""CPU cost of one steady decode step on the scheduler thread, without a model forward.

At batch 256 on an H100 a 1B model's decode step is as short as the scheduler thread's Python
work for it (issue #5), so that work decides the overhead ratio. This measures exactly that
work on any machine: a real ``Engine`` (real ``Scheduler``, page and slot allocators, output
processing, tokenizer and incremental detokenizer) whose launcher is replaced by a fake that
returns pre-made sampled ids at once. The model is a one-layer random stand-in that never runs;
the tokenizer is the default model's (SmolLM2), and the sampled ids are tokens of English text,
so detokenization does realistic work.

Per workload it decodes ``--batch-size`` requests and reports, over ``--steps`` steady decode
steps after ``--warmup-steps``, the median per step of

- ``schedule``: ``Scheduler.schedule`` (planning the step);
- ``core``: the core taking the step's ids (``Engine._consume``: append ids, EOS, stop-id and
  length checks, free what finished);
- ``text``: the text side (``OutputProcessor.process``: detokenize, stop strings, logprob
  records, build outputs), which the server runs in its API processes and the in-process
  engine on a thread of its own (here inline, so it is timed alone);
- ``core_total``: schedule + core: the step thread's CPU per step, in the server's engine
  core and in the in-process engine with its text thread;
- ``total``: all three, the thread that calls ``Engine.step`` with ``text_thread=False``.

Each workload is repeated ``--repeats`` times (interleaved); medians and min–max spreads are
over the repetitions. Workloads: ``stream`` (every request streams, as the server does),
``final`` (non-streaming, as ``Engine.generate``), ``stop`` (streaming with a stop string that
never matches, so every row runs the stop-string matcher), ``sampled`` (streaming, temperature
and top-p: only the plan's sampler needs differ) and ``logprobs`` (streaming, 5 top logprobs).

    python benchmarks/cpu_step_cost.py --batch-size 256 --repeats 7
    python benchmarks/cpu_step_cost.py --prefix-caching on off   # both engines, interleaved
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from graphrt import Engine, SamplingParams
from graphrt.measure import GcPauses, fmt_stat, summarize
from graphrt.overlap import StepProfiler, StepResult
from graphrt.step_plan import StepPlan

WORKLOADS = ["stream", "final", "stop", "sampled", "logprobs"]

# Decoded by the fake sampler, a token per position: ordinary English, no special tokens.
_TEXT = (
    "The scheduler plans one step ahead of the results it has seen. Positions and page needs "
    "are known from what has been launched, so a request's next decode is planned before its "
    "previous token reaches the host. Each step holds every running request that has finished "
    "its prefill, then continues unfinished prefills, then admits waiting requests, all within "
    "a token budget. When a decode row needs a page and none is free, the newest running "
    "request is preempted: its pages and slot are freed and it goes back to the front of the "
    "queue, to be recomputed from its prompt and outputs so far. Café, naïve, 東京, emoji 🚀. "
)

_TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


class _FakeHandle:
    """A ``StepHandle`` stand-in whose results are ready at once."""

    launched = True  # at submit, as inline mode's

    def __init__(self, plan: StepPlan, ids: np.ndarray, k: int) -> None:
        self.plan = plan
        self.step_id = plan.step_id
        self.wait_s = 0.0
        self._ids = ids
        self._k = k

    def wait_launched(self) -> None:
        pass

    def result(self) -> StepResult:
        b = self.plan.batch_size
        if not self.plan.needs.logprobs:
            return StepResult(self._ids, None, None, None, graph_bs=b)
        k = self._k
        top_ids = np.tile(self._ids[:, None], (1, k))
        top_lp = np.full((b, k), -0.5, dtype=np.float32)
        return StepResult(self._ids, np.full(b, -0.25, dtype=np.float32), top_ids, top_lp, b)

    def release(self) -> None:
        pass


class FakeLauncher:
    """Takes plans and "samples" a text token per row, chosen by slot and position, so a
    request's ids do not depend on the batch it runs in."""

    mode = "inline"
    overlapped = True

    def __init__(self, corpus: np.ndarray, k: int) -> None:
        self.corpus = corpus
        self.profiler: StepProfiler | None = None
        self._k = k

    def submit(self, plan: StepPlan) -> _FakeHandle:
        ids = self.corpus[(plan.seq_lens + plan.slots * 37) % len(self.corpus)]
        return _FakeHandle(plan, ids, self._k)

    def shutdown(self) -> None:
        pass


def make_engine(
    tokenizer_dir: Path,
    batch_size: int,
    model_dir: Path,
    prefix_caching: bool = True,
    gc_freeze: bool = True,
) -> Engine:
    """An engine with the real scheduler and output path and a launcher that never runs a model."""
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    (model_dir / "config.json").write_text(json.dumps({**_TINY_CONFIG, "vocab_size": vocab}))
    eng = Engine(
        str(model_dir),
        tokenizer=str(tokenizer_dir),
        load_format="dummy",
        device="cpu",
        overlap="inline",
        max_num_seqs=batch_size,
        max_num_batched_tokens=max(2048, batch_size * 80),
        cuda_graph_max_bs=batch_size,
        max_model_len=4096,
        num_pages=batch_size * 64 + 1,
        enable_prefix_caching=prefix_caching,
        # Inline, so each part is timed alone: the fake launcher never blocks, so a text
        # thread would only get the GIL at switch intervals and its time would land in the
        # step thread's parts (with a GPU the step thread waits on copy_done most of a step).
        text_thread=False,
        gc_freeze=gc_freeze,
        show_progress=False,
    )
    corpus = np.array(eng.tokenizer.encode(_TEXT * 4), dtype=np.int64)
    eng.use_launcher(FakeLauncher(corpus, k=5))  # type: ignore[arg-type]
    return eng


def _params(workload: str, max_tokens: int) -> tuple[SamplingParams, bool]:
    base = dict(max_tokens=max_tokens, ignore_eos=True, seed=1)
    if workload == "stream":
        return SamplingParams(temperature=0, **base), True
    if workload == "final":
        return SamplingParams(temperature=0, **base), False
    if workload == "stop":
        return SamplingParams(temperature=0, stop=["never appears", "\n\n\n"], **base), True
    if workload == "sampled":
        return SamplingParams(temperature=0.8, top_p=0.95, **base), True
    if workload == "logprobs":
        return SamplingParams(temperature=0, logprobs=5, **base), True
    raise ValueError(workload)


def run_once(
    eng: Engine, workload: str, bs: int, prompt_len: int, warm: int, steps: int
) -> dict[str, float]:
    """Per-step medians (ms) of one run of ``bs`` requests of ``workload``."""
    prof = StepProfiler(eng.runner.device)
    eng.set_profiler(prof)
    corpus = eng.launcher.corpus
    params, stream = _params(workload, warm + steps + 4)
    for i in range(bs):
        start = (i * 13) % (len(corpus) - prompt_len)
        eng.add_request(None, corpus[start : start + prompt_len].tolist(), params, stream=stream)
    outs = 0
    with GcPauses() as gcp:
        while eng.has_unfinished():
            outs += len(eng.step())
        eng.drain()
    eng.set_profiler(None)
    recs = [r for _, r in sorted(prof.records.items()) if r.is_decode and r.batch_size == bs]
    window = recs[warm : warm + steps]
    if len(window) < min(steps, 3):
        raise RuntimeError(f"only {len(window)} steady decode steps at bs={bs}")

    def med(f) -> float:
        return statistics.median(f(r) for r in window) * 1e3

    return {
        "schedule_ms": med(lambda r: r.schedule_s),
        "core_ms": med(lambda r: r.process_s),
        "text_ms": med(lambda r: r.text_s),
        "core_total_ms": med(lambda r: r.schedule_s + r.process_s),
        "total_ms": med(lambda r: r.schedule_s + r.process_s + r.text_s),
        # The whole run's collections (prefill included): a full one stalls the step loop.
        "gc_max_ms": gcp.max_ms,
        "gc_full": gcp.full,
        "outputs": outs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the default model's")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--prefix-caching",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="engines to measure, interleaved (default: on, the engine default)",
    )
    p.add_argument(
        "--gc-freeze",
        choices=["on", "off"],
        default="on",
        help="the engine's gc_freeze (default: on, the engine default); compare in separate "
        "runs: a freeze covers the whole process",
    )
    p.add_argument("--smoke", action="store_true", help="a few tiny runs (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.repeats, args.warmup_steps, args.steps = 4, 1, 2, 4
    tok_dir = args.tokenizer
    if tok_dir is None:
        from graphrt.models.default_model import ensure_default_model

        tok_dir = ensure_default_model()
    bs = args.batch_size
    engines: dict[str, Engine] = {}
    with tempfile.TemporaryDirectory() as d:
        freeze = args.gc_freeze == "on"
        for setting in args.prefix_caching:
            (Path(d) / setting).mkdir()
            engines[setting] = make_engine(
                Path(tok_dir), bs, Path(d) / setting, setting == "on", freeze
            )
        try:
            runs: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.repeats):
                for w in args.workloads:
                    for setting, eng in engines.items():
                        key = w if len(engines) == 1 else f"{w}, cache {setting}"
                        runs.setdefault(key, []).append(
                            run_once(eng, w, bs, args.prompt_len, args.warmup_steps, args.steps)
                        )
        finally:
            for eng in engines.values():
                eng.shutdown()
    result: dict = {"batch_size": bs, "steps": args.steps, "repeats": args.repeats}
    print(f"batch {bs}, {args.steps} steps x {args.repeats} repeats; ms per step, median [min-max]")
    for w, rs in runs.items():
        keys = ("schedule_ms", "core_ms", "text_ms", "core_total_ms", "total_ms", "gc_max_ms")
        row = {k: summarize(r[k] for r in rs) for k in keys}
        row["gc_full"] = summarize(r["gc_full"] for r in rs)
        result[w] = row
        cells = "  ".join(
            f"{k.removesuffix('_ms')} {fmt_stat(s)}" for k, s in row.items() if k != "gc_full"
        )
        print(f"{w:20s} {cells}  full GC {row['gc_full']['median']:.0f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
