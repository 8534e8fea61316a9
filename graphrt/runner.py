"""ModelRunner: turns a scheduled ``StepPlan`` into device work.

It owns everything on the device: weights, the KV pool, the slot-indexed state (token buffer,
page table, sampling parameters), the attention backend and the step graphs. Decode steps
replay the decode graph of the smallest batch bucket that fits; steps that carry prefill tokens
replay the mixed graph of the smallest token bucket that fits (``capture.mixed_graph_runner``).
Where nothing is captured (CPU) the same step functions run eagerly on the padded buffers;
above the largest bucket, and on CUDA with a backend that cannot capture mixed steps, steps run
eagerly unpadded.

All methods that launch work are called from one thread (the launcher, or the scheduler thread
when overlap is off or inline) and enqueue onto one forward stream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graphrt.capture.buckets import make_buckets
from graphrt.capture.graph_runner import DecodeGraphRunner, DecodeGraphSpec
from graphrt.capture.mixed_graph_runner import (
    MixedGraphRunner,
    MixedGraphSpec,
    default_token_buckets,
)
from graphrt.capture.static_buffers import StepIOLease
from graphrt.config import EngineConfig
from graphrt.forward_batch import ForwardBatch
from graphrt.host_copy import to_device
from graphrt.kernels.attention_backend import AttentionSpec, AttnInputs, get_backend_class
from graphrt.kernels.ops import make_ops
from graphrt.kernels.pdl import pdl_supported
from graphrt.kernels.reference import KV_FP8_DTYPE
from graphrt.memory.kv_pool import KVPool, KVPoolSpec, kv_cache_scales
from graphrt.models.loader import build_model, init_dummy, load_safetensors
from graphrt.models.model_config import ModelConfig
from graphrt.sampling import SampleOutputs, SamplerFlags, SlotSamplingState, sample
from graphrt.step_plan import StepPlan

logger = logging.getLogger(__name__)

# Steps above this many tokens run eagerly unless cuda_graph_max_tokens says otherwise: they are
# GPU-bound, so their launch cost hides under the GPU, and a bucket's padding is pure loss. On
# an H100, Llama-3.2-1B offline at an 8,192-token budget: 40,910 output tok/s with every step
# up to 8,192 graphed, 42,604 with graphs up to 2,048, 42,515 with none (RESULTS.md).
DEFAULT_GRAPH_MAX_TOKENS = 2048


@dataclass(frozen=True)
class ResolvedSettings:
    """The concrete choices behind ``"auto"`` config values."""

    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype  # the KV cache's: dtype, or float8_e4m3fn
    attention_backend: str
    ops: str
    pdl: bool  # launch the Triton kernels with programmatic dependent launch
    fuse_norms: str  # pre-norms folded into the one-row GEMVs: "auto", "on", "off" (Triton)
    max_model_len: int
    max_pages_per_seq: int
    num_slots: int


def resolve_settings(config: EngineConfig, model_cfg: ModelConfig) -> ResolvedSettings:
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device")
        # An explicit index: the launcher thread must select the same device.
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device(want)
    if config.dtype == "auto":
        # CPU kernels for bf16 matmuls are slow and HF parity is checked in fp32.
        dtype = model_cfg.torch_dtype if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    backend = config.attention_backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _has_triton_backend() else "torch"
    ops = "triton" if device.type == "cuda" and _has_triton_ops() else "torch"
    kv_dtype = dtype
    if config.kv_cache_dtype in ("fp8", "fp8_e4m3"):
        kv_dtype = KV_FP8_DTYPE
        _check_fp8_kv(backend, device, config.kv_cache_dtype)
    limit = model_cfg.max_position_embeddings
    max_len = config.max_model_len or limit
    if max_len > limit:
        raise ValueError(
            f"max_model_len={max_len} exceeds the model's max_position_embeddings ({limit})"
        )
    pages = -(-max_len // config.page_size)
    return ResolvedSettings(
        device=device,
        dtype=dtype,
        kv_dtype=kv_dtype,
        attention_backend=backend,
        ops=ops,
        pdl=config.pdl and ops == "triton" and pdl_supported(device),
        fuse_norms=config.fuse_norms if ops == "triton" else "off",
        max_model_len=max_len,
        max_pages_per_seq=pages,
        num_slots=config.max_num_seqs + 1,  # + the dummy slot
    )


def _check_fp8_kv(backend: str, device: torch.device, name: str) -> None:
    # Refused before any weight is loaded, naming the setting.
    if not get_backend_class(backend).fp8_kv:
        raise ValueError(
            f"kv_cache_dtype={name!r} needs attention_backend 'triton' or 'torch', not {backend!r}"
        )
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"kv_cache_dtype={name!r} needs a GPU with float8 support (sm_89 or newer); "
            f"this one is sm_{major}{minor}"
        )


def _has_triton_backend() -> bool:
    try:
        get_backend_class("triton")
        return True
    except ImportError:
        return False


def _has_triton_ops() -> bool:
    try:
        make_ops("triton")
        return True
    except ImportError:
        return False


@dataclass
class StepOutputs:
    """Device results of one step: the first ``rows`` rows of ``out`` are real."""

    out: SampleOutputs
    rows: int
    graph_bs: int | None  # the decode bucket replayed, or None
    # A graph step's ring slot (capture.static_buffers.StepIO): the step writes its sampled ids
    # there itself, so they need no copy. Released by whoever reads them.
    io: StepIOLease | None = None
    graph_tokens: int | None = None  # the mixed token bucket replayed, or None


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_dir: Path | None,
        model_cfg: ModelConfig,
        show_progress: bool = True,
    ) -> None:
        self.config = config
        s = self.settings = resolve_settings(config, model_cfg)
        self.device = s.device
        t0 = time.perf_counter()
        self.ops = make_ops(s.ops, pdl=s.pdl, fuse_norms=s.fuse_norms)
        self.model = build_model(
            model_cfg, self.ops, s.dtype, s.device, s.max_model_len + 1, config.quantization
        )
        self.model_cfg: ModelConfig = self.model.cfg
        ckpt_kv_scales: dict[int, tuple[float, float]] = {}
        if config.load_format == "dummy" or model_dir is None:
            init_dummy(self.model, config.seed)
        else:
            ckpt_kv_scales = load_safetensors(self.model, model_dir, show_progress=show_progress)
        # Every parameter once (a tied lm_head is the embedding): FP8 weights count one byte a
        # value plus their fp32 row scales. This is the weights' memory.
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        # What a step streams, the bytes of every MBU figure and roofline: the same, less an
        # untied input embedding, of which a step gathers one row per token (8 KB for the 8B)
        # rather than the table (1.05 GB). A tied table is read whole, by the lm_head.
        embed = self.model.embed_tokens
        self.step_weight_bytes = self.weight_bytes - (
            0 if self.model.lm_head is embed else embed.numel() * embed.element_size()
        )
        logger.info(
            "model %s loaded: %.2f GB of %s%s weights on %s in %.1fs",
            model_cfg.architecture,
            self.weight_bytes / 1e9,
            s.dtype,
            "" if self.model.fp8 is None else f" (linear layers FP8, {self.model.fp8.source})",
            s.device,
            time.perf_counter() - t0,
        )
        c = self.model_cfg
        self.kv_spec = KVPoolSpec(
            c.num_layers, c.num_kv_heads, c.head_dim, config.page_size, s.kv_dtype
        )
        # Each layer's (K, V) scales, read by the cache writes and attention of an FP8 cache:
        # the checkpoint's, else 1.0. A cache in the model's dtype has no use for them.
        self.kv_scales = None
        if s.kv_dtype == KV_FP8_DTYPE:
            self.kv_scales = kv_cache_scales(c.num_layers, s.device, ckpt_kv_scales)
            if not ckpt_kv_scales:
                logger.warning(
                    "FP8 KV cache with scales of 1.0: the checkpoint has none "
                    "(self_attn.k_scale / v_scale); values beyond +-448 saturate"
                )
        elif ckpt_kv_scales:
            logger.info("the checkpoint's KV-cache scales are unused: kv_cache_dtype is 'auto'")
        self.attn_spec = AttentionSpec(
            num_q_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            page_size=config.page_size,
            max_pages_per_seq=s.max_pages_per_seq,
            scale=c.head_dim**-0.5,
            dtype=s.dtype,
            device=s.device,
            pdl=s.pdl,
        )
        self.backend_cls = get_backend_class(s.attention_backend)
        # Slot-indexed device state. Slot 0 and page 0 are the dummies padded rows point at.
        self.token_buf = torch.zeros(s.num_slots, dtype=torch.int64, device=s.device)
        self.page_table = torch.zeros(
            s.num_slots, s.max_pages_per_seq, dtype=torch.int32, device=s.device
        )
        self.slot_state = SlotSamplingState(s.num_slots, c.vocab_size, s.device)
        self.max_logprobs = config.max_logprobs
        self.graphs: DecodeGraphRunner | None = None
        self.mixed_graphs: MixedGraphRunner | None = None
        self.kv: KVPool
        self.graph_memory_bytes = 0
        num_pages = self._plan_num_pages()
        self._allocate_kv(num_pages)
        self.graphs = self._make_decode_graphs(show_progress)
        self.mixed_graphs = self._make_mixed_graphs(show_progress)
        if self.device.type == "cuda":
            self.graph_memory_bytes = self._capture_graphs(self.graphs, self.mixed_graphs)

    def _make_decode_graphs(self, show_progress: bool) -> DecodeGraphRunner:
        cfg = self.config
        spec = DecodeGraphSpec(
            buckets=tuple(
                make_buckets(cfg.cuda_graph_max_bs, cfg.cuda_graph_batch_sizes, cfg.max_num_seqs)
            ),
            max_logprobs=self.max_logprobs,
            kv_len_bound=self.graph_kv_bound,
            cuda_graph_max_bs=cfg.cuda_graph_max_bs,
            masked_steps=cfg.cuda_graph_structured,
            vocab_size=self.model_cfg.vocab_size,
            logits_dtype=self.settings.dtype,
        )
        return DecodeGraphRunner(
            spec,
            self.decode_logits,
            self.sample_decode,
            self.ops.load_step_inputs,
            self.ops.store_step_ids,
            self.page_table,
            self.attn,
            self.decode_kv_bound,
            self.device,
            show_progress=show_progress,
        )

    def mixed_graph_spec(self) -> MixedGraphSpec | None:
        """The mixed graphs this runner keeps, or None: ``cuda_graph_max_tokens`` is 0, or the
        backend cannot capture mixed steps on CUDA (they then run eagerly)."""
        cfg = self.config
        max_t = cfg.cuda_graph_max_tokens
        if max_t is None:
            max_t = DEFAULT_GRAPH_MAX_TOKENS
        # No step holds more: the token budget, and every row at its longest.
        max_t = min(
            max_t, cfg.max_num_batched_tokens, cfg.max_num_seqs * self.settings.max_model_len
        )
        if max_t == 0 or (self.device.type == "cuda" and not self.backend_cls.mixed_graphs):
            return None
        return MixedGraphSpec(
            buckets=tuple(default_token_buckets(max_t)),
            max_num_seqs=cfg.max_num_seqs,
            max_logprobs=self.max_logprobs,
        )

    def _make_mixed_graphs(self, show_progress: bool) -> MixedGraphRunner | None:
        spec = self.mixed_graph_spec()
        if spec is None:
            return None
        return MixedGraphRunner(
            spec,
            self.mixed_forward,
            self.ops.load_step_inputs,
            self.ops.store_step_ids,
            self.page_table,
            self.device,
            show_progress=show_progress,
        )

    def _capture_graphs(
        self,
        decode: DecodeGraphRunner | None,
        mixed: MixedGraphRunner | None,
        mixed_buckets: list[int] | None = None,
    ) -> int:
        """Capture the mixed graphs (``mixed_buckets``, default all), then the decode graphs,
        into one memory pool: replays never overlap, and smaller graphs reuse the largest
        one's activations. Returns the graph memory in bytes."""
        rows = max(
            decode.max_bs if decode is not None else 0,
            mixed.spec.max_rows if mixed is not None else 0,
        )
        if rows == 0:
            return 0
        # Static attention buffers (split-K partials) for the most rows any graph has, before
        # any capture: a graph keeps the pointers it was captured with.
        self.attn.init_capture_graph(rows)
        pool = torch.cuda.graph_pool_handle()
        used = 0
        if mixed is not None and mixed.buckets:
            used += mixed.capture_all(pool, mixed_buckets)
        if decode is not None and decode.buckets:
            used += decode.capture_all(pool)
        return used

    def close(self) -> None:
        """Drop every device tensor this runner owns and return the memory to the driver."""
        for g in (self.graphs, self.mixed_graphs):
            if g is not None:
                g.close()
        self.graphs = None
        self.mixed_graphs = None
        for name in ("kv", "kv_scales", "attn", "model", "token_buf", "page_table", "slot_state"):
            if hasattr(self, name):
                delattr(self, name)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # cuBLAS keeps a workspace per (handle, stream) in the caching allocator; the
            # launcher and capture streams each got one.
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()
            torch.cuda.empty_cache()

    # ---- memory ---------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.kv.num_pages

    def _allocate_kv(self, num_pages: int) -> None:
        self.kv = KVPool(self.kv_spec, num_pages, self.device)
        self.attn = self.backend_cls(self.attn_spec, self.kv.k, self.kv.v, self.kv_scales)
        logger.info(
            "KV pool: %d pages of %d tokens (%.2f GB, %s)",
            num_pages,
            self.config.page_size,
            self.kv.nbytes / 1e9,
            self.kv_spec.dtype,
        )

    def _plan_num_pages(self) -> int:
        cfg, s = self.config, self.settings
        cap = cfg.max_num_seqs * s.max_pages_per_seq + 1
        if cfg.num_pages is not None:
            return cfg.num_pages
        per_page = self.kv_spec.bytes_per_page
        if self.device.type != "cuda":
            return max(2, min(cap, int(cfg.cpu_kv_cache_gb * 2**30) // per_page))
        # Measure, don't guess: peak activations of the largest eager step and the memory the
        # decode graphs take, each with a throwaway 2-page pool, then give the KV pool what is
        # left of gpu_memory_utilization.
        self._allocate_kv(2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        self._profile_run()
        activations = torch.cuda.max_memory_allocated() - base
        # The mixed graphs' memory is that of the largest bucket: the pool is shared and the
        # smaller buckets reuse it (capturing them all here would double their capture time).
        probe = self._make_decode_graphs(show_progress=False)
        mixed_probe = self._make_mixed_graphs(show_progress=False)
        largest = mixed_probe.buckets[-1:] if mixed_probe is not None else None
        graph_bytes = self._capture_graphs(probe, mixed_probe, largest) + probe.static_bytes
        for g in (probe, mixed_probe):
            if g is not None:
                g.close()
        del probe, mixed_probe
        del self.kv, self.attn
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used = total - free
        budget = int(total * cfg.gpu_memory_utilization) - used - activations - graph_bytes
        num = budget // per_page
        logger.info(
            "GPU memory: %.2f GB total, %.2f GB in use, activations %.2f GB, graphs %.2f GB, "
            "KV budget %.2f GB",
            total / 1e9,
            used / 1e9,
            activations / 1e9,
            graph_bytes / 1e9,
            max(budget, 0) / 1e9,
        )
        if num < s.max_pages_per_seq + 1:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache: {max(budget, 0) / 1e9:.2f} GB left "
                f"fits {max(num, 0)} pages, one full-length sequence needs "
                f"{s.max_pages_per_seq}. Raise gpu_memory_utilization, or lower max_model_len, "
                "max_num_batched_tokens or cuda_graph_max_bs."
            )
        return min(num, cap)

    def _profile_run(self) -> None:
        """One eager forward of the largest step the scheduler can form (``largest_step_rows``),
        writing only the dummy page."""
        q = largest_step_rows(
            self.config.max_num_batched_tokens,
            self.config.max_num_seqs,
            self.settings.max_model_len,
        )
        n = int(q.sum())
        rows = len(q)
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        positions = torch.zeros(n, dtype=torch.int64, device=self.device)
        cu = np.concatenate([[0], np.cumsum(q)])
        seq = q.copy()
        inputs = AttnInputs(
            is_decode=False,
            seq_lens=torch.from_numpy(seq).to(self.device, torch.int32),
            page_rows=torch.zeros(
                rows, self.settings.max_pages_per_seq, dtype=torch.int32, device=self.device
            ),
            kv_len_bound=int(seq.max()),
            cu_q=torch.from_numpy(cu).to(self.device, torch.int32),
            max_q_len=int(q.max()),
            seq_lens_host=seq,
            cu_q_host=cu,
        )
        # Every token maps to the dummy page, so the run only measures activation memory; the
        # attention itself still sees each row's full causal length.
        fb = ForwardBatch(
            input_ids=ids,
            positions=positions,
            kv_locs=torch.zeros_like(ids),
            logits_rows=torch.from_numpy(cu[1:] - 1).to(self.device),
            attn_backend=self.attn,
            attn_meta=None,
        )
        with torch.inference_mode():
            fb.attn_meta = self.attn.prepare_metadata(inputs)
            out = SampleOutputs.allocate(rows, self.max_logprobs, self.device)
            slots = torch.zeros(rows, dtype=torch.int64, device=self.device)
            self._forward_and_sample(fb, slots, slots, slots, SamplerFlags(True, True, True), out)
        torch.cuda.synchronize()

    # ---- steps ----------------------------------------------------------------------------
    def prepare(self, plan: StepPlan, page_updates: bool = True) -> None:
        """Apply a plan's slot inits and (unless a graph step carries them in its input copy)
        page-table updates, before its step, on the same stream."""
        if plan.slot_inits:
            self.slot_state.write(plan.slot_inits)
        if page_updates and plan.page_updates.shape[1]:
            upd = to_device(plan.page_updates, self.device)
            self.page_table.index_put_((upd[0], upd[1]), upd[2].to(torch.int32))

    def execute(self, plan: StepPlan, masked: bool = False) -> StepOutputs:
        """Enqueue one step. Returns device outputs; nothing here waits for the GPU.

        ``masked``: only the forward half of a split step (``defers_masks``); its outputs are
        written by ``execute_sampler``, which must come next on this stream."""
        with torch.inference_mode():
            flags = plan.needs
            graphs = self.graphs
            bucket = None
            # Constrained rows not split (``masked``) run eagerly, whose sampler applies the
            # plan's token masks.
            graphable = plan.token_masks is None
            if masked or (graphable and plan.is_decode and graphs is not None):
                bucket = graphs.bucket_for(plan.batch_size)
            elif graphable and not plan.is_decode and (mixed := self.mixed_graphs) is not None:
                tokens = mixed.bucket_for(plan)
                if tokens is not None:
                    in_ring = mixed.fits_page_updates(plan, tokens)
                    self.prepare(plan, page_updates=not in_ring)
                    out, lease = mixed.run(plan, tokens, flags, page_updates=in_ring)
                    return StepOutputs(out, plan.batch_size, None, lease, graph_tokens=tokens)
            if bucket is None:
                self.prepare(plan)
                return StepOutputs(self._eager(plan, flags), plan.batch_size, None)
            in_ring = graphs.fits_page_updates(plan, bucket)
            self.prepare(plan, page_updates=not in_ring)
            out, lease = graphs.run(plan, bucket, flags, page_updates=in_ring, masked=masked)
            return StepOutputs(out, plan.batch_size, bucket, lease)

    def defers_masks(self, plan: StepPlan) -> bool:
        """Whether a step with constrained rows can run split: its forward enqueued before its
        token masks exist (``execute(plan, masked=True)``), its sampler after
        (``execute_sampler``). Decode steps within the largest bucket, with
        ``cuda_graph_structured``; other steps take their masks up front and run eagerly."""
        g = self.graphs
        return (
            plan.is_decode
            and g is not None
            and g.masked_steps
            and g.bucket_for(plan.batch_size) is not None
        )

    def execute_sampler(self, plan: StepPlan, outputs: StepOutputs, masks: torch.Tensor) -> None:
        """The sampler half of ``plan``'s split step, whose forward gave ``outputs``
        (``execute(plan, masked=True)``): ``masks`` is the host's int32 ``[>= bucket, words]``
        (pinned on CUDA), its first rows the plan's token masks. Enqueues; does not wait."""
        with torch.inference_mode():
            self.graphs.run_sampler(outputs.graph_bs, plan.needs, masks, outputs.rows)

    def decode_logits(
        self,
        slots: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        kv_len_bound: int,
        capture_bs: int | None = None,
        seq_lens_host: np.ndarray | None = None,
        attn_meta: object | None = None,
    ) -> torch.Tensor:
        """A decode step up to its ``[B, V]`` logits, entirely from device tensors: one token
        per row.

        Input ids come from the token buffer; page rows and KV write locations from the page
        table. ``capture_bs`` marks graph capture (backends then build static metadata).
        ``seq_lens_host`` is given on eager steps, for backends that plan on the host.
        """
        ps = self.config.page_size
        input_ids = self.token_buf.index_select(0, slots)
        page_rows = self.page_table.index_select(0, slots)
        page = page_rows.gather(1, (positions // ps)[:, None])[:, 0].to(torch.int64)
        kv_locs = page * ps + positions % ps
        if attn_meta is None:
            inputs = AttnInputs(
                is_decode=True,
                seq_lens=seq_lens.to(torch.int32),
                page_rows=page_rows,
                kv_len_bound=kv_len_bound,
                seq_lens_host=seq_lens_host,
            )
            if capture_bs is None:
                attn_meta = self.attn.prepare_metadata(inputs)
            else:
                attn_meta = self.attn.prepare_for_capture(capture_bs, inputs)
        fb = ForwardBatch(
            input_ids=input_ids,
            positions=positions,
            kv_locs=kv_locs,
            logits_rows=None,  # one token a row: every row's logits, no gather
            attn_backend=self.attn,
            attn_meta=attn_meta,
        )
        return self.model.compute_logits(self.model(fb))

    def sample_decode(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: torch.Tensor,
        flags: SamplerFlags,
        out: SampleOutputs,
        token_masks: torch.Tensor | None = None,
    ) -> None:
        """A decode step's sampler: each row's token, at position ``seq_lens``, into ``out``
        and its slot of the token buffer."""
        self._sample(logits, slots, slots, seq_lens, flags, out, token_masks)

    def decode_forward(
        self,
        slots: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        out: SampleOutputs,
        flags: SamplerFlags,
        kv_len_bound: int,
        capture_bs: int | None = None,
        attn_meta: object | None = None,
        seq_lens_host: np.ndarray | None = None,
        token_masks: torch.Tensor | None = None,
    ) -> None:
        """One decode step, forward and sampler (``decode_logits``, ``sample_decode``);
        ``token_masks`` on eager steps with constrained rows (``sample``)."""
        logits = self.decode_logits(
            slots, positions, seq_lens, kv_len_bound, capture_bs, seq_lens_host, attn_meta
        )
        self.sample_decode(logits, slots, seq_lens, flags, out, token_masks)

    def mixed_forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        token_slots: torch.Tensor,
        slots: torch.Tensor,
        out_slots: torch.Tensor,
        seq_lens: torch.Tensor,
        cu_q: torch.Tensor,
        out: SampleOutputs,
        flags: SamplerFlags,
        capture: bool,
    ) -> None:
        """A step of ``T`` tokens in ``R`` rows (prefill chunks and one-token rows), entirely
        from device tensors of static shape: the captured function of mixed graphs.

        Ids of -1 are the slot's last sample, from the token buffer; KV write locations come
        from the page table. Every row samples from its last token (a row that feeds nothing
        samples into the dummy slot through ``out_slots``, as do prefill chunks that do not end
        their prompt).
        """
        ps = self.config.page_size
        table = self.page_table
        ids = torch.where(input_ids < 0, self.token_buf.index_select(0, token_slots), input_ids)
        flat = token_slots * table.shape[1] + positions // ps
        page = table.view(-1).index_select(0, flat).to(torch.int64)
        inputs = AttnInputs(
            is_decode=False,
            seq_lens=seq_lens.to(torch.int32),
            page_rows=table.index_select(0, slots),
            kv_len_bound=self.graph_kv_bound,
            cu_q=cu_q.to(torch.int32),
        )
        fb = ForwardBatch(
            input_ids=ids,
            positions=positions,
            kv_locs=page * ps + positions % ps,
            logits_rows=(cu_q[1:] - 1).clamp(min=0),
            attn_backend=self.attn,
            attn_meta=self.attn.prepare_for_mixed(inputs, capture),
        )
        self._forward_and_sample(fb, slots, out_slots, seq_lens, flags, out)

    def _eager(self, plan: StepPlan, flags: SamplerFlags) -> SampleOutputs:
        dev = self.device
        b, t = plan.batch_size, plan.num_tokens
        out = SampleOutputs.allocate(b, self.max_logprobs, dev)
        masks = None if plan.token_masks is None else to_device(plan.token_masks, dev)
        if plan.is_decode:
            packed = np.stack([plan.slots, plan.seq_lens - 1, plan.seq_lens])
            d = to_device(packed, dev)
            self.decode_forward(
                d[0],
                d[1],
                d[2],
                out,
                flags,
                self.decode_kv_bound(int(plan.seq_lens.max())),
                seq_lens_host=plan.seq_lens,
                token_masks=masks,
            )
            return out
        cu = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(plan.query_lens, out=cu[1:])
        token_slots = np.repeat(plan.slots, plan.query_lens)
        packed = np.concatenate(
            [
                plan.input_ids,
                plan.positions,
                token_slots,
                plan.slots,
                plan.out_slots,
                plan.seq_lens,
                cu,
            ]
        )
        d = to_device(packed, dev)
        ids, positions, tslots = d[:t], d[t : 2 * t], d[2 * t : 3 * t]
        o = 3 * t
        slots, out_slots, seq_lens, cu_d = (
            d[o : o + b],
            d[o + b : o + 2 * b],
            d[o + 2 * b : o + 3 * b],
            d[o + 3 * b :],
        )
        # Decode rows (-1) take their input from the token buffer, written by the last step.
        ids = torch.where(ids < 0, self.token_buf.index_select(0, tslots), ids)
        ps = self.config.page_size
        page = self.page_table[tslots, positions // ps].to(torch.int64)
        kv_locs = page * ps + positions % ps
        inputs = AttnInputs(
            is_decode=False,
            seq_lens=seq_lens.to(torch.int32),
            page_rows=self.page_table.index_select(0, slots),
            kv_len_bound=_round_up(int(plan.seq_lens.max()), ps),
            cu_q=cu_d.to(torch.int32),
            max_q_len=int(plan.query_lens.max()),
            seq_lens_host=plan.seq_lens,
            cu_q_host=cu,
        )
        fb = ForwardBatch(
            input_ids=ids,
            positions=positions,
            kv_locs=kv_locs,
            logits_rows=cu_d[1:] - 1,
            attn_backend=self.attn,
            attn_meta=self.attn.prepare_metadata(inputs),
        )
        self._forward_and_sample(fb, slots, out_slots, seq_lens, flags, out, masks)
        return out

    def _forward_and_sample(
        self,
        fb: ForwardBatch,
        slots: torch.Tensor,
        out_slots: torch.Tensor,
        positions: torch.Tensor,
        flags: SamplerFlags,
        out: SampleOutputs,
        token_masks: torch.Tensor | None = None,
    ) -> None:
        """The model, its logits and the sampler: the tail every step shares (see ``sample``)."""
        logits = self.model.compute_logits(self.model(fb))
        self._sample(logits, slots, out_slots, positions, flags, out, token_masks)

    def _sample(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        out_slots: torch.Tensor,
        positions: torch.Tensor,
        flags: SamplerFlags,
        out: SampleOutputs,
        token_masks: torch.Tensor | None,
    ) -> None:
        sample(
            logits,
            slots,
            out_slots,
            positions,
            self.slot_state,
            self.token_buf,
            flags,
            out,
            self.ops.argmax,
            token_masks,
            self.ops.apply_token_bitmask,
        )

    def decode_kv_bound(self, max_seq_len: int) -> int:
        """Static KV-length bound of decode steps run without a graph, whose longest row holds
        ``max_seq_len`` tokens.

        On CUDA it is the page-table width, as in the captured graphs, so kernels that size
        their work from it (split-K) compute exactly what a replay computes. On CPU, where
        nothing is captured, the real maximum keeps the torch reference fast.
        """
        if self.device.type == "cuda":
            return self.graph_kv_bound
        return _round_up(max_seq_len, self.config.page_size)

    @property
    def graph_kv_bound(self) -> int:
        """The static KV-length bound every graph is captured with: the page-table width in
        tokens."""
        return self.settings.max_pages_per_seq * self.config.page_size


def largest_step_rows(max_tokens: int, max_num_seqs: int, max_len: int) -> np.ndarray:
    """Query lengths of the largest step the scheduler can form: ``max_tokens`` tokens, or
    fewer where ``max_num_seqs`` rows of ``max_len`` tokens hold less, spread evenly over as
    many rows as it may have. No row is longer than ``max_len``: its page-table row holds no
    more, and the attention kernels read a row's pages up to its length."""
    n = min(max_tokens, max_num_seqs * max_len)
    rows = min(max_num_seqs, n)
    q = np.full(rows, n // rows, dtype=np.int64)
    q[: n % rows] += 1
    return q


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
