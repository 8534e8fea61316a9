"""Capture steps that carry prefill tokens as CUDA graphs, one per token-count bucket, and replay
them.

A mixed step feeds ``T`` tokens in ``R`` rows: prefill chunks and one-token rows (decode rows,
and last chunks of one token) in any mix. The graph of token bucket ``T`` holds ``R = min(T,
max_num_seqs)`` rows, enough for any step of at most ``T`` tokens, and its attention is the
backend's static-shape path (``AttentionBackend.prepare_for_mixed``): one launch shape serves
every split of the tokens into rows, because the kernels read each row's query offsets and
lengths from the step's inputs on the device. These are full graphs, as vLLM's FULL mode; the
choice against piecewise graphs is argued in ``docs/ARCHITECTURE.md``.

Padding tokens belong to no row and sit in the dummy slot at position 0, so their K/V go to the
dummy page; padding rows feed no token and sample into the dummy slot. Each step's inputs, its
query offsets and its page-table writes come through a pinned ring slot (``StepIO``, in the
mixed layout of ``static_buffers``) that the graph's first kernel reads, and its last kernel
writes the sampled ids back into the slot, as decode graphs do: one replay per step, nothing
else enqueued.

The runner is given what it needs explicitly (the step's forward function, the ops that load
and store the ring, the page table), not the ``ModelRunner``. It needs no attention backend:
only backends that plan nothing on the host are captured, so a replay has no hook to call.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from graphrt.capture.graph_runner import (
    BucketStats,
    StepGraph,
    capture_buckets,
    capture_graph,
    variant_for,
)
from graphrt.capture.static_buffers import (
    M_UPDATES,
    RING_SLOTS,
    MixedBuffers,
    StepIO,
    StepIOLease,
    fill_mixed_inputs,
    mixed_padding,
)
from graphrt.sampling import SampleOutputs, SamplerFlags
from graphrt.step_plan import StepPlan

logger = logging.getLogger(__name__)


class MixedForward(Protocol):
    """The captured function of a mixed step (``ModelRunner.mixed_forward``)."""

    def __call__(
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
    ) -> None: ...


def default_token_buckets(max_tokens: int) -> list[int]:
    """Every 16 tokens up to 256 (where the step is launch-bound and padding is cheap in
    absolute terms), then steps of about 1.5x, and ``max_tokens`` itself."""
    if max_tokens <= 0:
        return []
    sizes = set(range(16, min(256, max_tokens) + 1, 16))
    for s in (384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384):
        if s <= max_tokens:
            sizes.add(s)
    sizes.add(max_tokens)
    return sorted(sizes)


@dataclass(frozen=True)
class MixedGraphSpec:
    """What the mixed graphs are captured for."""

    buckets: tuple[int, ...]  # token counts, sorted
    max_num_seqs: int
    max_logprobs: int

    def rows_for(self, tokens: int) -> int:
        """Rows the graph of token bucket ``tokens`` holds: a step never has more rows than
        tokens, nor more than ``max_num_seqs``."""
        return min(tokens, self.max_num_seqs)

    @property
    def max_rows(self) -> int:
        return self.rows_for(self.buckets[-1]) if self.buckets else 0


class MixedGraphRunner:
    """Owns the mixed steps' static buffers, their pinned ring and their graphs."""

    def __init__(
        self,
        spec: MixedGraphSpec,
        forward: MixedForward,
        load_step_inputs: Callable,
        store_step_ids: Callable,
        page_table: torch.Tensor,
        device: torch.device,
        show_progress: bool = True,
    ) -> None:
        self.spec = spec
        self.buckets = list(spec.buckets)
        self.forward = forward
        self.load_step_inputs = load_step_inputs
        self.store_step_ids = store_step_ids
        self.page_table = page_table
        self.device = device
        self.show_progress = show_progress
        max_t = self.buckets[-1] if self.buckets else 0
        self.buffers = MixedBuffers.allocate(max_t, spec.max_rows, spec.max_logprobs, device)
        self.io = StepIO(
            RING_SLOTS, max_t + 1, device, padding=mixed_padding(max_t + 1), max_ids=spec.max_rows
        )
        self.graphs: dict[tuple[int, SamplerFlags], StepGraph] = {}
        self.stats: list[BucketStats] = []
        self._out_views = {t: self.buffers.out.narrow(spec.rows_for(t)) for t in self.buckets}

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def bucket_for(self, plan: StepPlan) -> int | None:
        """The smallest token bucket that holds the plan, or None (run it eagerly)."""
        i = bisect.bisect_left(self.buckets, plan.num_tokens)
        if i == len(self.buckets):
            return None
        t = self.buckets[i]
        return t if plan.batch_size <= self.spec.rows_for(t) else None

    def fits_page_updates(self, plan: StepPlan, bucket: int) -> bool:
        """Whether the plan's page-table writes fit the bucket's ``T + 1`` ring columns (a step
        that maps a long cached prefix into a new row may write more; the caller then applies
        them before the replay)."""
        return plan.page_updates.shape[1] <= bucket + 1

    # ---- capture --------------------------------------------------------------------------
    def capture_all(self, pool: object, buckets: list[int] | None = None) -> int:
        """Capture ``buckets`` (default: all), largest first, into ``pool``. The caller has
        called the backend's ``init_capture_graph`` for at least ``spec.max_rows`` rows.
        Returns the graph memory in bytes."""
        return capture_buckets(
            buckets if buckets is not None else self.buckets,
            lambda t, flags: StepGraph(
                capture_graph(lambda: self._step(t, flags, capture=True), pool), self.io
            ),
            self.graphs,
            self.stats,
            self.io,
            what="mixed step of {} tokens",
            oom_hint="cuda_graph_max_tokens",
            off_hint="Set cuda_graph_max_tokens=0 to run steps with prefill tokens eagerly.",
            show_progress=self.show_progress,
        )

    def _step(
        self, tokens: int, flags: SamplerFlags, capture: bool, rows: int | None = None
    ) -> SampleOutputs:
        """One mixed step of bucket ``tokens`` on the static buffers: what a graph holds, and
        what ``run`` calls eagerly where nothing is captured. Its first kernel loads the ring
        slot (inputs and page-table writes) and its last stores the sampled ids into it.
        ``rows``: fewer rows than the bucket holds (uncaptured steps only)."""
        if rows is None:
            rows = self.spec.rows_for(tokens)
            out = self._out_views[tokens]
        else:
            out = self.buffers.out.narrow(rows)
        io = self.io
        self.load_step_inputs(
            io.inputs_dev, io.pos, self.buffers.inputs, self.page_table, tokens + 1, M_UPDATES
        )
        self.forward(*self.buffers.views(tokens, rows), out, flags, capture)
        self.store_step_ids(out.ids, io.ids_dev, io.pos)
        return out

    def uncaptured_rows(self, batch_size: int, tokens: int) -> int:
        """Rows an uncaptured step of ``batch_size`` rows in bucket ``tokens`` runs with: still
        padded (so CPU runs exercise padding rows), but to the next power of two, at least 8,
        not to the bucket's ``R``: on CPU every padding row costs its logits and sampling."""
        return min(self.spec.rows_for(tokens), max(8, 1 << (batch_size - 1).bit_length()))

    def close(self) -> None:
        """Release the graphs."""
        for g in self.graphs.values():
            g.reset()
        self.graphs.clear()

    # ---- replay ---------------------------------------------------------------------------
    def run(
        self, plan: StepPlan, bucket: int, flags: SamplerFlags, page_updates: bool
    ) -> tuple[SampleOutputs, StepIOLease]:
        """Write the plan into the next ring slot and replay (or, where nothing is captured,
        run the same step eagerly). Returns the device outputs (the bucket's rows; the plan's
        are first) and the step's hold on its ring slot. ``page_updates``: the plan's
        page-table writes go in the slot (see ``fits_page_updates``); otherwise the caller has
        applied them. Enqueues on the current stream; does not wait for the GPU."""
        io = self.io
        count, staging = io.slot_inputs()
        upd = plan.page_updates if page_updates and plan.page_updates.shape[1] else None
        graph = self.graphs.get((bucket, variant_for(flags)))
        if graph is not None:
            fill_mixed_inputs(staging, plan, bucket, self.spec.rows_for(bucket), upd)
            graph.replay()
            out = self._out_views[bucket]
        else:
            # Nothing captured: the same step function, with the step's own sampler features
            # rather than its graph variant's, and fewer padding rows.
            rows = self.uncaptured_rows(plan.batch_size, bucket)
            fill_mixed_inputs(staging, plan, bucket, rows, upd)
            out = self._step(bucket, flags, capture=False, rows=rows)
            io.next += 1
        return out, io.lease(count, plan.step_id)


def token_pad_waste(buckets: list[int], num_tokens: np.ndarray) -> float:
    """Fraction of a mixed graph's tokens that are padding, for a distribution of step sizes."""
    real = padded = 0
    for t in num_tokens:
        i = bisect.bisect_left(buckets, int(t))
        if i < len(buckets):
            real += int(t)
            padded += buckets[i]
    return 1.0 - real / padded if padded else 0.0
