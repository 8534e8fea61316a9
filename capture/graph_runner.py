"""Capture one decode step per batch-size bucket as a CUDA graph, and replay it.

Two graphs per bucket: a greedy one (argmax only) and one with the whole sampler (temperature,
penalties, filters, logprobs). A step replays the greedy graph when none of its rows needs more.

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
from graphrt.sampling import EVERYTHING, GREEDY, SampleOutputs, SamplerFlags
from graphrt.step_plan import StepPlan

logger = logging.getLogger(__name__)

VARIANTS: tuple[SamplerFlags, ...] = (GREEDY, EVERYTHING)


def variant_for(flags: SamplerFlags) -> SamplerFlags:
    return GREEDY if flags == GREEDY else EVERYTHING


class CaptureError(RuntimeError):
    """A bucket failed to capture; the message names it and the setting to lower."""


@dataclass
class BucketStats:
    bs: int
    capture_s: float
    graph_bytes: int


class StepGraph:
    """A captured step graph (decode or mixed). ``replay`` also advances the host's count of its
    ring's graph steps, which must match the device's (``StepIO``): replay only through here."""

    __slots__ = ("graph", "io")

    def __init__(self, graph: torch.cuda.CUDAGraph, io: StepIO) -> None:
        self.graph = graph
        self.io = io

    def replay(self) -> None:
        self.graph.replay()
        self.io.next += 1

    def reset(self) -> None:
        self.graph.reset()


class DecodeForward(Protocol):
    """The captured function of a decode step (``ModelRunner.decode_forward``)."""

    def __call__(
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
    ) -> None: ...


@dataclass(frozen=True)
class DecodeGraphSpec:
    """What the decode graphs are captured for."""

    buckets: tuple[int, ...]  # batch sizes, sorted
    max_logprobs: int
    kv_len_bound: int  # the page-table width in tokens: the static bound attention sees
    cuda_graph_max_bs: int  # for error messages


class DecodeGraphRunner:
    """Owns the decode static buffers, the pinned step ring and the graphs, given its
    dependencies explicitly: the step's forward function, the ops that load and store the ring,
    the page table, the attention backend, and (CPU, uncaptured steps) the KV bound of an eager
    decode step."""

    def __init__(
        self,
        spec: DecodeGraphSpec,
        forward: DecodeForward,
        load_step_inputs: Callable,
        store_step_ids: Callable,
        page_table: torch.Tensor,
        attn: AttentionBackend,
        eager_kv_bound: Callable[[int], int],
        device: torch.device,
        show_progress: bool = True,
    ) -> None:
        self.spec = spec
        self.forward = forward
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
        self.graphs: dict[tuple[int, SamplerFlags], StepGraph] = {}
        self.stats: list[BucketStats] = []
        self.pool: object | None = None
        # Each bucket's views of the output buffers, made once: four slicing ops per replay
        # are CPU time on the launch's critical path.
        self._out_views = {bs: self.buffers.out.narrow(bs) for bs in self.buckets}

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

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
        return capture_buckets(
            self.buckets,
            lambda bs, flags: self._capture(bs, flags, pool),
            self.graphs,
            self.stats,
            self.io,
            what="decode bucket bs={}",
            oom_hint=f"cuda_graph_max_bs (now {self.spec.cuda_graph_max_bs})",
            off_hint="Set cuda_graph_max_bs=0 to run decode eagerly.",
            show_progress=self.show_progress,
        )

    def _step(
        self,
        bs: int,
        flags: SamplerFlags,
        kv_len_bound: int,
        capture: bool,
        seq_lens_host: np.ndarray | None = None,
    ) -> None:
        """One decode step of bucket ``bs`` on the static buffers: what a graph holds, and what
        ``run`` calls eagerly where nothing is captured (CPU). Its first kernel loads the
        step's ring slot (inputs and page-table writes), its last stores the sampled ids into
        the slot and advances the device's count of steps."""
        io = self.io
        slots, positions, seq_lens = self.buffers.views(bs)
        out = self._out_views[bs]
        self.load_step_inputs(
            io.inputs_dev, io.pos, self.buffers.inputs, self.page_table, bs, UPDATES
        )
        self.forward(
            slots,
            positions,
            seq_lens,
            out,
            flags,
            kv_len_bound,
            capture_bs=bs if capture else None,
            seq_lens_host=seq_lens_host,
        )
        self.store_step_ids(out.ids, io.ids_dev, io.pos)

    def _capture(self, bs: int, flags: SamplerFlags, pool: object) -> StepGraph:
        def step() -> None:
            self._step(bs, flags, self.kv_len_bound, capture=True)

        return StepGraph(capture_graph(step, pool), self.io)

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
        self, plan: StepPlan, bucket: int, flags: SamplerFlags, page_updates: bool = False
    ) -> tuple[SampleOutputs, StepIOLease]:
        """Write the plan into the next ring slot and replay (or, where nothing is captured,
        run the same step eagerly). Returns the device outputs and the step's hold on its slot,
        whose ``ids`` row holds the sampled ids once the step has run; release it after.

        ``page_updates``: the plan's page-table writes go in the slot and the graph's first
        kernel applies them (see ``fits_page_updates``); otherwise the caller has applied
        them. Enqueues on the current stream; does not wait for the GPU.
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
        variant = variant_for(flags)
        graph = self.graphs.get((bucket, variant))
        if graph is not None:
            # Backends that plan on the host (flashinfer) refresh their static metadata here.
            self.attn.prepare_for_replay(bucket, host[SEQ_LENS], host[SLOTS])
            graph.replay()
        else:
            bound = self.eager_kv_bound(int(plan.seq_lens.max()))
            self._step(bucket, variant, bound, False, host[SEQ_LENS])
            io.next += 1
        return self._out_views[bucket], io.lease(count, plan.step_id)


def capture_buckets(
    buckets: list[int],
    capture_one: Callable[[int, SamplerFlags], StepGraph],
    graphs: dict[tuple[int, SamplerFlags], StepGraph],
    stats: list[BucketStats],
    io: StepIO,
    what: str,
    oom_hint: str,
    off_hint: str,
    show_progress: bool,
) -> int:
    """Capture every sampler variant of each bucket, largest first, into ``graphs``, with a
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
            for flags in VARIANTS:
                graphs[(size, flags)] = capture_one(size, flags)
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
