"""Engine configuration: one frozen, validated dataclass that is also the source of CLI defaults."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_origin

Device = Literal["auto", "cuda", "cpu"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
LoadFormat = Literal["auto", "safetensors", "dummy"]
AttentionBackendName = Literal["auto", "torch", "triton", "flashinfer"]
JsonWhitespace = Literal["fixed", "flexible"]
OverlapMode = Literal["thread", "inline", "off", "two_events"]
FuseNorms = Literal["auto", "on", "off"]
# "fp8" is vLLM's alias of "fp8_e4m3".
KVCacheDType = Literal["auto", "fp8", "fp8_e4m3"]
# Values of ``quantization`` besides None (graphrt.models.fp8_checkpoint.QUANTIZATIONS, kept
# here too so that reading the config imports no model code).
QUANTIZATIONS = ("fp8",)

_HELP: dict[str, str] = {
    "model": "local Hugging Face model directory; default: SmolLM2-135M-Instruct, prepared on "
    "first use",
    "tokenizer": "tokenizer directory (default: the model directory)",
    "load_format": "'safetensors' weights, or 'dummy' random weights from config.json alone",
    "dtype": "weight and activation dtype; 'auto' is the checkpoint's dtype on CUDA, fp32 on CPU",
    "device": "'cuda', 'cpu', or 'auto' (cuda when available)",
    "quantization": "'fp8': quantize the decoder's linear weights to float8 e4m3 with "
    "per-output-channel scales at load time (embeddings, lm_head and norms stay in dtype); FP8 "
    "checkpoints (quantization_config) load as FP8 whatever this says",
    "kv_cache_dtype": "KV cache element type: 'auto', the model's dtype; 'fp8' or 'fp8_e4m3', "
    "float8 e4m3 with one scale per layer for K and one for V (1.0), half the bytes of bf16: "
    "twice the tokens in the pool, and half the attention's reads in decode (the triton and "
    "torch attention backends; sm_89+ on CUDA)",
    "seed": "seed for dummy weights and for requests that give no seed",
    "page_size": "tokens per KV-cache page",
    "gpu_memory_utilization": "fraction of total GPU memory graphrt may use (weights, graphs, "
    "KV pool)",
    "num_pages": "KV pages to allocate, overriding the memory-based sizing",
    "cpu_kv_cache_gb": "KV pool budget on CPU, in GiB",
    "max_model_len": "longest sequence (prompt + output); default: the model's limit",
    "max_num_seqs": "most requests running at once (decode batch size limit)",
    "max_num_batched_tokens": "token budget of one step (chunked prefill size)",
    "admission_interval": "while decode rows run, admit waiting requests at most every N steps "
    "(1: every step); larger values batch admissions into fewer, larger prefill steps, for "
    "throughput, at the cost of up to N - 1 decode steps of time to first token",
    "max_waiting_requests": "most requests queued before new ones are refused",
    "enable_prefix_caching": "reuse the KV pages of prompt prefixes seen before (full pages, "
    "least recently used evicted first when pages run out)",
    "max_logprobs": "most top logprobs a request may ask for",
    "attention_backend": "attention kernels: 'torch' (reference), 'triton', 'flashinfer'",
    "cuda_graph_max_bs": "largest decode batch captured as a CUDA graph; 0 disables graphs",
    "cuda_graph_batch_sizes": "explicit decode batch-size buckets to capture",
    "cuda_graph_max_tokens": "largest step with prefill tokens captured as a CUDA graph, by "
    "token-count bucket (default: 2048, or max_num_batched_tokens if smaller; larger steps are "
    "GPU-bound and run eagerly); 0 runs every such step eagerly",
    "cuda_graph_structured": "also capture each decode bucket split in two (the forward to the "
    "logits, then the sampler with token masks), for decode steps with structured-output rows: "
    "their forward runs while the host fills the masks; off, such steps run eagerly (saves "
    "capture time and a [cuda_graph_max_bs, vocab] logits buffer)",
    "fuse_norms": "fold each pre-norm (residual add included) into the one-row GEMV that reads "
    "it (qkv, gate/up), one kernel fewer each in batch-1 steps: 'auto' where it measured faster "
    "(FP8 weights), 'on' for bf16 weights too, 'off' nowhere",
    "pdl": "launch the Triton kernels with programmatic dependent launch where the GPU supports "
    "it (sm_90+): each kernel's launch overlaps the end of the one before",
    "overlap": "'thread': launcher thread, scheduler one step ahead; 'inline': one step ahead "
    "on the scheduler thread; 'off': synchronous; 'two_events': also waits on launch_done",
    "json_whitespace": "whitespace that JSON-constrained outputs may use: 'fixed', one line with "
    "', ' and ': ' between items (as json.dumps writes; the cheapest masks, about 8x cheaper "
    "to fill); 'flexible', up to 32 whitespace characters between tokens, for models that "
    "pretty-print",
    "grammar_threads": "threads that advance structured-output rows' grammars and fill their "
    "token masks each step (xgrammar's batched calls; on a split step's critical path); 0: one "
    "thread up to 128 constrained rows, then half the cores up to 8 (as vLLM); N: N threads for "
    "every batch; 1: all on the step thread",
    "text_thread": "run the text side (detokenization, stop strings, outputs) on a thread of its "
    "own, behind the step loop, instead of on the step thread after each step",
    "gc_freeze": "after start-up, move every live object out of the cyclic garbage collector's "
    "reach (gc.freeze; undone by shutdown): a full collection over the objects torch and "
    "transformers leave takes 40-170 ms, a stall of dozens of steps",
}


@dataclass(frozen=True)
class EngineConfig:
    """Every engine setting. Values are validated on construction; unknown keys are refused.

    ``None`` for ``model`` means the default model. Derived, device-dependent values (the
    concrete dtype, device and backend) are resolved by the engine, not stored here.
    """

    model: str | None = None
    tokenizer: str | None = None
    load_format: LoadFormat = "auto"
    dtype: DType = "auto"
    device: Device = "auto"
    quantization: str | None = None
    kv_cache_dtype: KVCacheDType = "auto"
    seed: int = 0
    page_size: int = 16
    gpu_memory_utilization: float = 0.85
    num_pages: int | None = None
    cpu_kv_cache_gb: float = 1.0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    admission_interval: int = 1
    max_waiting_requests: int = 4096
    enable_prefix_caching: bool = True
    max_logprobs: int = 20
    attention_backend: AttentionBackendName = "auto"
    cuda_graph_max_bs: int = 256
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    cuda_graph_max_tokens: int | None = None
    cuda_graph_structured: bool = True
    grammar_threads: int = 0
    json_whitespace: JsonWhitespace = "fixed"
    fuse_norms: FuseNorms = "auto"
    pdl: bool = True
    overlap: OverlapMode = "thread"
    text_thread: bool = True
    gc_freeze: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), _resolved_hints()[f.name])
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be None or one of {list(QUANTIZATIONS)}, "
                f"got {self.quantization!r}"
            )
        _check_range("page_size", self.page_size, 1, 1024)
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        _check_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.05, 0.99)
        if self.num_pages is not None:
            _check_range("num_pages", self.num_pages, 2, 1 << 31)
        _check_range("cpu_kv_cache_gb", self.cpu_kv_cache_gb, 0.001, 4096)
        if self.max_model_len is not None:
            _check_range("max_model_len", self.max_model_len, 2, 1 << 24)
        _check_range("max_num_seqs", self.max_num_seqs, 1, 8192)
        _check_range("max_num_batched_tokens", self.max_num_batched_tokens, 16, 1 << 20)
        _check_range("admission_interval", self.admission_interval, 1, 1 << 16)
        _check_range("max_waiting_requests", self.max_waiting_requests, 1, 1 << 24)
        _check_range("max_logprobs", self.max_logprobs, 0, 1024)
        _check_range("cuda_graph_max_bs", self.cuda_graph_max_bs, 0, 8192)
        _check_range("grammar_threads", self.grammar_threads, 0, 256)
        if self.cuda_graph_max_tokens is not None:
            _check_range("cuda_graph_max_tokens", self.cuda_graph_max_tokens, 0, 1 << 20)
        if self.cuda_graph_batch_sizes is not None:
            sizes = self.cuda_graph_batch_sizes
            # bool is an int subclass; refuse it here as _check_type does for int fields.
            bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or s < 1]
            if not sizes or bad:
                raise ValueError(
                    f"cuda_graph_batch_sizes must be a non-empty list of positive ints, got {sizes}"
                )
            if len(set(sizes)) != len(sizes):
                raise ValueError(f"cuda_graph_batch_sizes has duplicates: {sizes}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build a config, refusing unknown keys with a did-you-mean hint."""
        known = {f.name for f in fields(cls)}
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(f"unknown engine setting(s): {', '.join(hints)}")
        if isinstance(kwargs.get("cuda_graph_batch_sizes"), list):
            kwargs["cuda_graph_batch_sizes"] = tuple(kwargs["cuda_graph_batch_sizes"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--flag`` per field, with the dataclass default as the flag's default."""
        hints = _resolved_hints()
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            tp = hints[f.name]
            choices = _literal_choices(tp)
            kwargs: dict[str, Any] = {"default": f.default, "help": _HELP.get(f.name, "")}
            if choices:
                kwargs["choices"] = choices
            elif f.name == "quantization":
                kwargs["choices"] = list(QUANTIZATIONS)
            elif f.name == "cuda_graph_batch_sizes":
                kwargs["type"] = int
                kwargs["nargs"] = "+"
            elif tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction  # --pdl / --no-pdl
            else:
                kwargs["type"] = _scalar_type(tp)
            if kwargs["help"]:
                kwargs["help"] += f" (default: {f.default})"
            parser.add_argument(flag, dest=f.name, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        """Collect the fields added by :meth:`add_cli_args` from parsed arguments."""
        kw = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if kw.get("cuda_graph_batch_sizes") is not None:
            kw["cuda_graph_batch_sizes"] = tuple(kw["cuda_graph_batch_sizes"])
        return cls(**kw)


@functools.cache
def _resolved_hints() -> dict[str, Any]:
    return typing.get_type_hints(EngineConfig)


def _literal_choices(tp: Any) -> list[str] | None:
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    return None


def _scalar_type(tp: Any) -> type:
    args = [a for a in get_args(tp) if a is not type(None)] or [tp]
    base = args[0]
    return base if base in (int, float, str) else str


def _check_type(name: str, value: Any, tp: Any) -> None:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{name} must be one of {list(get_args(tp))}, got {value!r}")
        return
    allowed = get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)
    ok = False
    for a in allowed:
        if a is type(None):
            ok |= value is None
        elif get_origin(a) is tuple:
            ok |= isinstance(value, tuple)
        elif a is float:
            ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
        elif a is int:
            ok |= isinstance(value, int) and not isinstance(value, bool)
        else:
            ok |= isinstance(value, a)
    if not ok:
        raise TypeError(f"{name} must be of type {tp}, got {value!r} ({type(value).__name__})")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
