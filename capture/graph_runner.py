"""Capture one decode step per batch-size bucket as a CUDA graph, and replay it.

Two graphs per bucket: a greedy one (argmax only) and one with the whole sampler (temperature,
penalties, filters, logprobs). A step replays the greedy graph when none of its rows needs more.

Steps with structured-output rows replay a bucket's split graphs instead (``masked_steps``): the
forward up to the logits, then, once the host has filled the rows' token masks, a sampler graph
(greedy or whole) that applies them. The forward runs on the GPU while the host advances the
grammars past the step before and fills the masks (``Engine._launch_next``); the fused graphs,
and every unconstrained step, are untouched.

A graph step enqueues nothing but its replay: the graph's first kernel loads the step's inputs
from a pinned ring slot and its last stores the sampled ids into it (``StepIO``), so no copy
and no other operation stands between two graphs on the stream.

Graphs are captured largest bucket first into one shared memory pool, so smaller buckets reuse
the larger ones' activation memory. On CPU nothing is captured: ``run`` calls the same step
function eagerly on the bucket's padded static buffers, through the same ring, so bucket
choice, padding, the ring's slots and buffer handling are exercised without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from graphrt.capture.buckets import bucket_for
from graphrt.capture.static_buffers import (
    RING_SLOTS,
    SEQ_LENS,
    SLOTS,
    UPDATES,
    DecodeBuffers,
    StepIO,
    StepIOLease,
    fill_inputs,
)
from graphrt.kernels.attention_backend import AttentionBackend
from graphrt.sampling import EVERYTHING, GREEDY, SAMPLED, SampleOutputs, SamplerFlags
from graphrt.step_plan import StepPlan
from graphrt.structured_outputs import bitmask_words

logger = logging.getLogger(__name__)

VARIANTS: tuple[SamplerFlags, ...] = (GREEDY, SAMPLED, EVERYTHING)
# Keys of a decode bucket's split graphs: the forward to the logits, and the masked samplers.
LOGITS = "logits"
MASKED_VARIANTS: tuple[tuple[str, SamplerFlags], ...] = tuple(("masked", v) for v in VARIANTS)
_MASKED_KEY = dict(zip(VARIANTS, MASKED_VARIANTS, strict=True))


def variant_for(flags: SamplerFlags) -> SamplerFlags:
    """The captured sampler that covers ``flags``: the lightest of ``VARIANTS`` that does."""
    if flags == GREEDY:
        return GREEDY
    return SAMPLED if not (flags.filters or flags.logprobs) else EVERYTHING


class CaptureError(RuntimeError):
    """A bucket failed to capture; the message names it and the setting to lower."""


@dataclass
class BucketStats:
    bs: int
    capture_s: float
    graph_bytes: int


class StepGraph:
    """A captured step graph (decode or mixed). ``replay`` also advances the host's count of its
    ring's graph steps, which must match the device's (``StepIO``): replay only through here.
    ``io`` is None for the forward half of a split step, which stores no ids and so counts no
    step (its sampler graph does)."""

    __slots__ = ("graph", "io")

    def __init__(self, graph: torch.cuda.CUDAGraph, io: StepIO | None) -> None:
        self.graph = graph
        self.io = io

    def replay(self) -> None:
        self.graph.replay()
        if self.io is not None:
            self.io.next += 1

    def reset(self) -> None:
        self.graph.reset()


class DecodeLogits(Protocol):
    """A decode step up to its logits (``ModelRunner.decode_logits``)."""

    def __call__(
        self,
        slots: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        kv_len_bound: int,
        capture_bs: int | None = None,
        seq_lens_host: np.ndarray | None = None,
    ) -> torch.Tensor: ...


class DecodeSample(Protocol):
    """A decode step's sampler (``ModelRunner.sample_decode``): rows' tokens from their
    logits, each at position ``seq_lens``, into ``out`` and the token buffer."""

    def __call__(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: torch.Tensor,
        flags: SamplerFlags,
        out: SampleOutputs,
        token_masks: torch.Tensor | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class DecodeGraphSpec:
    """What the decode graphs are captured for."""

    buckets: tuple[int, ...]  # batch sizes, sorted
    max_logprobs: int
    kv_len_bound: int  # the page-table width in tokens: the static bound attention sees
    cuda_graph_max_bs: int  # for error messages
    # Split graphs for steps with structured-output rows (see the module docstring); their
    # static logits ([max_bs, vocab_size] of logits_dtype) and token masks live in the runner.
    masked_steps: bool = False
    vocab_size: int = 0
    logits_dtype: torch.dtype = torch.float32

    @property
    def mask_words(self) -> int:
        """int32 words of one row's token bitmask."""
        return bitmask_words(self.vocab_size)


class DecodeGraphRunner:
    """Owns the decode static buffers, the pinned step ring and the graphs, given its
    dependencies explicitly: the step's forward and sampler functions, the ops that load and
    store the ring, the page table, the attention backend, and (CPU, uncaptured steps) the KV
    bound of an eager decode step."""

    def __init__(
        self,
        spec: DecodeGraphSpec,
        logits_fn: DecodeLogits,
        sample_fn: DecodeSample,
        load_step_inputs: Callable,
        store_step_ids: Callable,
        page_table: torch.Tensor,
        attn: AttentionBackend,
        eager_kv_bound: Callable[[int], int],
        device: torch.device,
        show_progress: bool = True,
    ) -> None:
        self.spec = spec
        self.logits_fn = logits_fn
        self.sample_fn = sample_fn
        self.load_step_inputs = load_step_inputs
        self.store_step_ids = store_step_ids
        self.page_table = page_table
        self.attn = attn
        self.eager_kv_bound = eager_kv_bound
        self.device = device
        self.buckets = list(spec.buckets)
        self.max_bs = self.buckets[-1] if self.buckets else 0
        self.show_progress = show_progress
        self.kv_len_bound = spec.kv_len_bound
        self.buffers = DecodeBuffers.allocate(max(self.max_bs, 1), spec.max_logprobs, device)
        # As many slots as the launcher has steps in flight (its ResourcePool).
        self.io = StepIO(RING_SLOTS, max(self.max_bs, 1), device)
        self.graphs: dict[tuple[int, object], StepGraph] = {}
        self.stats: list[BucketStats] = []
        self.pool: object | None = None
        # Each bucket's views of the output buffers, made once: four slicing ops per replay
        # are CPU time on the launch's critical path.
        self._out_views = {bs: self.buffers.out.narrow(bs) for bs in self.buckets}
        # Split steps: the forward graph writes the logits here and the sampler graph reads
        # them, with the token masks the host copies in between (all ones: padding allows all).
        self.masked_steps = spec.masked_steps and bool(self.buckets)
        self.logits: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        if self.masked_steps:
            rows = self.max_bs
            self.logits = torch.zeros(rows, spec.vocab_size, dtype=spec.logits_dtype, device=device)
            self.masks = torch.full((rows, spec.mask_words), -1, dtype=torch.int32, device=device)
        # On CUDA the masks' copy runs on a stream of its own, ordered after the sampler that
        # last read them (``_masks_read``) and before the one that reads them next: the copy
        # (about 1 MB at 64 rows of a 128k vocabulary) then overlaps the forward it follows
        # instead of extending the step.
        self._mask_stream: torch.cuda.Stream | None = None
        self._masks_copied: torch.cuda.Event | None = None
        self._masks_read: torch.cuda.Event | None = None
        if self.masks is not None and self.masks.is_cuda:
            self._mask_stream = torch.cuda.Stream(device)
            self._masks_copied = torch.cuda.Event()
            self._masks_read = torch.cuda.Event()

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    @property
    def static_bytes(self) -> int:
        """Device memory of the split steps' static logits and masks (outside the graph pool)."""
        return sum(t.numel() * t.element_size() for t in (self.logits, self.masks) if t is not None)

    def bucket_for(self, batch_size: int) -> int | None:
        return bucket_for(self.buckets, batch_size)

    # ---- capture --------------------------------------------------------------------------
    def capture_all(self, pool: object | None = None) -> int:
        """Capture every bucket, largest first, into ``pool`` (a new one if None; the caller
        has called the backend's ``init_capture_graph`` for at least ``max_bs`` rows). Returns
        the graph memory in bytes."""
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        self.pool = pool  # benchmarks capture variants of a bucket into the same pool
        variants: tuple[object, ...] = VARIANTS
        if self.masked_steps:
            variants += (LOGITS, *MASKED_VARIANTS)
        return capture_buckets(
            self.buckets,
            lambda bs, key: self._capture(bs, key, pool),
            self.graphs,
            self.stats,
            self.io,
            what="decode bucket bs={}",
            oom_hint=f"cuda_graph_max_bs (now {self.spec.cuda_graph_max_bs})",
            off_hint="Set cuda_graph_max_bs=0 to run decode eagerly.",
            show_progress=self.show_progress,
            variants=variants,
        )

    def _forward(
        self, bs: int, kv_len_bound: int, capture: bool, seq_lens_host: np.ndarray | None
    ) -> torch.Tensor:
        """The first half of a decode step of bucket ``bs`` on the static buffers: its first
        kernel loads the step's ring slot (inputs and page-table writes); returns the logits."""
        io = self.io
        slots, positions, seq_lens = self.buffers.views(bs)
        self.load_step_inputs(
            io.inputs_dev, io.pos, self.buffers.inputs, self.page_table, bs, UPDATES
        )
        return self.logits_fn(
            slots,
            positions,
            seq_lens,
            kv_len_bound,
            capture_bs=bs if capture else None,
            seq_lens_host=seq_lens_host,
        )

    def _sample(
        self, bs: int, logits: torch.Tensor, flags: SamplerFlags, masks: torch.Tensor | None
    ) -> None:
        """The second half: sample, store the ids into the step's ring slot and advance the
        device's count of steps (the last kernel)."""
        slots, _, seq_lens = self.buffers.views(bs)
        out = self._out_views[bs]
        self.sample_fn(logits, slots, seq_lens, flags, out, masks)
        self.store_step_ids(out.ids, self.io.ids_dev, self.io.pos)

    def _step(
        self,
        bs: int,
        flags: SamplerFlags,
        kv_len_bound: int,
        capture: bool,
        seq_lens_host: np.ndarray | None = None,
    ) -> None:
        """One decode step of bucket ``bs`` on the static buffers: what a fused graph holds, and
        what ``run`` calls eagerly where nothing is captured (CPU)."""
        self._sample(bs, self._forward(bs, kv_len_bound, capture, seq_lens_host), flags, None)

    def _forward_to_buffer(
        self, bs: int, kv_len_bound: int, capture: bool, seq_lens_host: np.ndarray | None = None
    ) -> None:
        """The forward half of a split step: the logits go to the static buffer."""
        self.logits[:bs].copy_(self._forward(bs, kv_len_bound, capture, seq_lens_host))

    def _sample_masked(self, bs: int, flags: SamplerFlags) -> None:
        """The sampler half of a split step, with the static token masks."""
        self._sample(bs, self.logits[:bs], flags, self.masks[:bs])

    def _capture(self, bs: int, key: object, pool: object) -> StepGraph:
        bound = self.kv_len_bound
        if key == LOGITS:
            graph = capture_graph(lambda: self._forward_to_buffer(bs, bound, True), pool)
            return StepGraph(graph, None)
        if isinstance(key, tuple):  # ("masked", flags)
            flags = key[1]
            return StepGraph(capture_graph(lambda: self._sample_masked(bs, flags), pool), self.io)
        return StepGraph(capture_graph(lambda: self._step(bs, key, bound, True), pool), self.io)

    def close(self) -> None:
        """Release the graphs and their memory pool."""
        for g in self.graphs.values():
            g.reset()
        self.graphs.clear()

    # ---- replay ---------------------------------------------------------------------------
    def fits_page_updates(self, plan: StepPlan, bucket: int) -> bool:
        """Whether ``run`` can carry the plan's page-table writes in its ring slot (a decode
        step writes at most one per row, so always, short of a bug)."""
        return plan.page_updates.shape[1] <= bucket

    def run(
        self,
        plan: StepPlan,
        bucket: int,
        flags: SamplerFlags,
        page_updates: bool = False,
        masked: bool = False,
    ) -> tuple[SampleOutputs, StepIOLease]:
        """Write the plan into the next ring slot and replay (or, where nothing is captured,
        run the same step eagerly). Returns the device outputs and the step's hold on its slot,
        whose ``ids`` row holds the sampled ids once the step has run; release it after.

        ``page_updates``: the plan's page-table writes go in the slot and the graph's first
        kernel applies them (see ``fits_page_updates``); otherwise the caller has applied
        them. ``masked``: run only the forward half of a split step (``masked_steps``); the
        step samples, and its outputs are written, when ``run_sampler`` is called, before any
        other step is run. Enqueues on the current stream; does not wait for the GPU.
        """
        io = self.io
        count, staging = io.slot_inputs()
        host = fill_inputs(
            staging,
            plan.slots,
            plan.seq_lens,
            bucket,
            plan.page_updates if page_updates and plan.page_updates.shape[1] else None,
        )
        key = LOGITS if masked else variant_for(flags)
        graph = self.graphs.get((bucket, key))
        if graph is not None:
            # Backends that plan on the host (flashinfer) refresh their static metadata here.
            self.attn.prepare_for_replay(bucket, host[SEQ_LENS], host[SLOTS])
            graph.replay()
        else:
            bound = self.eager_kv_bound(int(plan.seq_lens.max()))
            if masked:
                self._forward_to_buffer(bucket, bound, False, host[SEQ_LENS])
            else:
                self._step(bucket, key, bound, False, host[SEQ_LENS])
                io.next += 1
        return self._out_views[bucket], io.lease(count, plan.step_id)

    def run_sampler(
        self, bucket: int, flags: SamplerFlags, masks: torch.Tensor, rows: int
    ) -> SampleOutputs:
        """The sampler half of the split step ``run(..., masked=True)`` just enqueued: copy the
        host ``masks`` (int32 ``[>= bucket, words]``, pinned on CUDA; its first ``rows`` rows
        are the step's) to the device, then sample. Rows from ``rows`` to ``bucket`` are
        padding: they are set to allow all first, so one copy carries the bucket."""
        masks[rows:bucket].fill_(-1)
        self._copy_masks(masks[:bucket])
        key = _MASKED_KEY[variant_for(flags)]
        graph = self.graphs.get((bucket, key))
        if graph is not None:
            graph.replay()
        else:
            self._sample_masked(bucket, key[1])
            self.io.next += 1
        if self._masks_read is not None:
            self._masks_read.record()
        return self._out_views[bucket]

    def _copy_masks(self, host: torch.Tensor) -> None:
        """Copy the host masks into ``self.masks``; the current stream's next kernel sees them."""
        dst = self.masks[: host.shape[0]]
        if self._mask_stream is None:
            dst.copy_(host, non_blocking=True)
            return
        self._mask_stream.wait_event(self._masks_read)  # the last sampler has read the old ones
        with torch.cuda.stream(self._mask_stream):
            dst.copy_(host, non_blocking=True)
            self._masks_copied.record()
        torch.cuda.current_stream().wait_event(self._masks_copied)


def capture_buckets(
    buckets: list[int],
    capture_one: Callable[[int, object], StepGraph],
    graphs: dict[tuple[int, object], StepGraph],
    stats: list[BucketStats],
    io: StepIO,
    what: str,
    oom_hint: str,
    off_hint: str,
    show_progress: bool,
    variants: tuple[object, ...] = VARIANTS,
) -> int:
    """Capture every graph of each bucket (one per key of ``variants``: by default each
    sampler variant), largest first, into ``graphs``, with a
    ``BucketStats`` each in ``stats``; then restart ``io``'s step counts, which the warm-up runs
    advanced. ``what`` names a bucket (``{}`` is its size) in errors; ``oom_hint`` is the
    setting to lower when memory runs out, ``off_hint`` how to run without these graphs.
    Returns the graph memory in bytes."""
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    label = what.split(" ")[0]
    order = sorted(buckets, reverse=True)
    bar = tqdm(order, desc=f"Capturing {label} graphs", disable=not show_progress)
    for size in bar:
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info()[0]
        name = what.format(size)
        try:
            for key in variants:
                graphs[(size, key)] = capture_one(size, key)
        except torch.cuda.OutOfMemoryError as e:
            raise CaptureError(
                f"out of memory while capturing {name}: lower {oom_hint} or "
                f"gpu_memory_utilization; {e}"
            ) from None
        except Exception as e:
            msg = f"capturing {name} failed: {type(e).__name__}: {e}. {off_hint}"
            raise CaptureError(msg) from e
        free1 = torch.cuda.mem_get_info()[0]
        stats.append(BucketStats(size, time.perf_counter() - t0, free0 - free1))
        bar.set_postfix(size=size, free_gb=f"{free1 / 1e9:.2f}")
    torch.cuda.synchronize()
    io.reset()
    used = free_before - torch.cuda.mem_get_info()[0]
    n = len(graphs)
    logger.info("captured %d %s graphs (%d buckets), %.1f MB", n, label, len(order), used / 1e6)
    return used


def capture_graph(step: Callable[[], None], pool: object) -> torch.cuda.CUDAGraph:
    """Capture ``step`` into a graph of memory pool ``pool``, after two warm-up runs on a side
    stream: cuBLAS workspaces, Triton compilation and autotuning must not happen during
    capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
        step()
    return graph


def pad_waste(buckets: list[int], batch_sizes: np.ndarray) -> float:
    """Fraction of replayed rows that are padding, for a distribution of batch sizes."""
    real = padded = 0
    for b in batch_sizes:
        bk = bucket_for(buckets, int(b))
        if bk is not None:
            real += int(b)
            padded += bk
    return 1.0 - real / padded if padded else 0.0
