"""FP8 weights against the unquantized model: teacher forcing over a fixed public-domain text.

Prints top-1 agreement and both perplexities (issue #21's bars: agreement >= 95%, FP8
perplexity within +3%) and the weight bytes of each. CPU by default (fp32 reference); on a GPU
pass ``--device cuda`` (bf16 reference); ``--dtype bfloat16`` runs both models in bf16 on the
CPU too (the issue's reference). ``--floor float32`` also scores the unquantized model against
itself in that dtype: how far the reference dtype alone moves the tokens. ``--kv-cache-dtype
fp8`` also scores an FP8 KV cache, alone and with FP8 weights.

    python benchmarks/fp8_accuracy.py [--model DIR] [--device cpu|cuda] [--dtype DTYPE]
        [--floor DTYPE] [--kv-cache-dtype fp8] [--text FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graphrt import Engine
from graphrt.measure import teacher_forced

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "declaration_gettysburg.txt"


def read_text(path: Path) -> str:
    """The text after its one header line (which says where it is from)."""
    return path.read_text().split("\n", 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument(
        "--floor",
        default=None,
        choices=["float32", "bfloat16"],
        help="also score the unquantized model in --dtype against this dtype",
    )
    ap.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8"],
        help="fp8: also score an FP8 KV cache, alone and with FP8 weights",
    )
    ap.add_argument("--text", type=Path, default=TEXT)
    args = ap.parse_args()
    # (dtype, quantization, kv_cache_dtype) of each run; the first is the reference.
    runs = [(args.dtype, None, "auto"), (args.dtype, "fp8", "auto")]
    if args.kv_cache_dtype == "fp8":
        runs += [(args.dtype, None, "fp8"), (args.dtype, "fp8", "fp8")]
    if args.floor:
        runs.append((args.floor, None, "auto"))
    results, ids = {}, None
    for dt, quant, kv in runs:
        eng = Engine(
            model=args.model,
            device=args.device,
            dtype=dt,
            quantization=quant,
            kv_cache_dtype=kv,
            max_num_seqs=1,
        )
        if ids is None:
            ids = eng.tokenizer.encode(read_text(args.text))
            dtype = eng.runner.settings.dtype
        results[dt, quant, kv] = (teacher_forced(eng, ids), eng.runner.weight_bytes)
        eng.shutdown()
    ref, ref_bytes = results[runs[0]]
    for what, run in (
        ("fp8 accuracy", runs[1]),
        ("fp8 KV cache accuracy", (args.dtype, None, "fp8")),
        ("fp8 weights + KV cache accuracy", (args.dtype, "fp8", "fp8")),
    ):
        if run not in results:
            continue
        got, got_bytes = results[run]
        print(
            f"{what}: {args.text.name}, {len(ref.nll)} positions, reference {dtype}: "
            f"top-1 agreement {got.agreement(ref):.2%}, perplexity {ref.perplexity:.4f} -> "
            f"{got.perplexity:.4f} ({got.perplexity / ref.perplexity - 1:+.2%}); weights "
            f"{ref_bytes / 1e6:.1f} MB -> {got_bytes / 1e6:.1f} MB"
        )
    if args.floor:
        base = results[args.floor, None, "auto"][0]
        print(
            f"floor: the unquantized model in {dtype} against {args.floor}: top-1 agreement "
            f"{ref.agreement(base):.2%}, perplexity {ref.perplexity / base.perplexity - 1:+.2%}"
        )


if __name__ == "__main__":
    main()
