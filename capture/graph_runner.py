"""Capture one decode step per batch-size bucket as a CUDA graph, and replay it.

Two graphs per bucket: a greedy one (argmax only) and one with the whole sampler (temperature,
penalties, filters, logprobs). A step replays the greedy graph when none of its rows needs more.

Graphs are captured largest bucket first into one shared memory pool, so smaller buckets reuse
the larger ones' activation memory. On CPU nothing is captured: ``run`` calls the same step
function eagerly on the bucket's padded static buffers, so bucket choice, padding and buffer
handling are exercised without a GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from graphrt.capture.buckets import bucket_for, make_buckets
from graphrt.capture.static_buffers import (
    INPUT_ROWS,
    SEQ_LENS,
    SLOTS,
    UPDATES,
    DecodeBuffers,
    fill_inputs,
)
from graphrt.sampling import EVERYTHING, GREEDY, SampleOutputs, SamplerFlags
from graphrt.step_plan import StepPlan

if TYPE_CHECKING:
    from graphrt.runner import ModelRunner

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


class DecodeGraphRunner:
    """Owns the decode static buffers and graphs of one ``ModelRunner``."""

    def __init__(self, runner: ModelRunner, show_progress: bool = True) -> None:
        cfg = runner.config
        self.runner = runner
        self.device = runner.device
        self.buckets = make_buckets(
            cfg.cuda_graph_max_bs, cfg.cuda_graph_batch_sizes, cfg.max_num_seqs
        )
        self.max_bs = self.buckets[-1] if self.buckets else 0
        self.show_progress = show_progress
        self.kv_len_bound = runner.settings.max_pages_per_seq * cfg.page_size
        self.buffers = DecodeBuffers.allocate(max(self.max_bs, 1), runner.max_logprobs, self.device)
        self.graphs: dict[tuple[int, SamplerFlags], torch.cuda.CUDAGraph] = {}
        self.stats: list[BucketStats] = []
        pin = self.device.type == "cuda"
        # A small ring of pinned staging arrays: a step's H2D copy may still be reading one
        # while the next step is prepared. Each slot waits on the event of its last copy.
        self._staging = [
            torch.empty(INPUT_ROWS, max(self.max_bs, 1), dtype=torch.int64, pin_memory=pin)
            for _ in range(4)
        ]
        self._staging_events = [torch.cuda.Event() if pin else None for _ in self._staging]
        self._next_staging = 0
        # Each bucket's views of the output buffers, made once: four slicing ops per replay
        # are CPU time on the launch's critical path.
        self._out_views = {bs: self.buffers.out.narrow(bs) for bs in self.buckets}

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def bucket_for(self, batch_size: int) -> int | None:
        return bucket_for(self.buckets, batch_size)

    # ---- capture --------------------------------------------------------------------------
    def capture_all(self) -> int:
        """Capture every bucket, largest first. Returns the graph memory in bytes."""
        assert self.device.type == "cuda"
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        self.pool = pool  # benchmarks capture variants of a bucket into the same pool
        self.runner.attn.init_capture_graph(self.max_bs)
        order = sorted(self.buckets, reverse=True)
        bar = tqdm(order, desc="Capturing decode graphs", disable=not self.show_progress)
        for bs in bar:
            t0 = time.perf_counter()
            free0 = torch.cuda.mem_get_info()[0]
            try:
                for flags in VARIANTS:
                    self.graphs[(bs, flags)] = self._capture(bs, flags, pool)
            except torch.cuda.OutOfMemoryError as e:
                raise CaptureError(
                    f"out of memory while capturing decode bucket bs={bs}: lower "
                    f"cuda_graph_max_bs (now {self.runner.config.cuda_graph_max_bs}) or "
                    f"gpu_memory_utilization; {e}"
                ) from None
            except Exception as e:
                raise CaptureError(
                    f"capturing decode bucket bs={bs} failed: {type(e).__name__}: {e}. "
                    "Set cuda_graph_max_bs=0 to run decode eagerly."
                ) from e
            free1 = torch.cuda.mem_get_info()[0]
            self.stats.append(BucketStats(bs, time.perf_counter() - t0, free0 - free1))
            bar.set_postfix(bs=bs, free_gb=f"{free1 / 1e9:.2f}")
        torch.cuda.synchronize()
        used = free_before - torch.cuda.mem_get_info()[0]
        logger.info(
            "captured %d decode graphs (%d buckets), %.1f MB",
            len(self.graphs),
            len(self.buckets),
            used / 1e6,
        )
        return used

    def _capture(self, bs: int, flags: SamplerFlags, pool: object) -> torch.cuda.CUDAGraph:
        r = self.runner
        slots, positions, seq_lens = self.buffers.views(bs)
        out = self.buffers.out.narrow(bs)
        updates = self.buffers.inputs[UPDATES:, :bs]

        def step() -> None:
            # The step's page-table writes (most steps have none) as the graph's first node:
            # an op between the input copy and the replay costs the GPU tens of microseconds.
            r.ops.scatter_page_updates(r.page_table, updates)
            r.decode_forward(
                slots, positions, seq_lens, out, flags, self.kv_len_bound, capture_bs=bs
            )

        # Warm up outside the graph on a side stream: cuBLAS workspaces, Triton compilation
        # and autotuning must not happen during capture.
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

    def close(self) -> None:
        """Release the graphs and their memory pool."""
        for g in self.graphs.values():
            g.reset()
        self.graphs.clear()

    # ---- replay ---------------------------------------------------------------------------
    def fits_page_updates(self, plan: StepPlan, bucket: int) -> bool:
        """Whether ``run`` can carry the plan's page-table writes in its input copy (a decode
        step writes at most one per row, so always, short of a bug)."""
        return plan.page_updates.shape[1] <= bucket

    def run(
        self, plan: StepPlan, bucket: int, flags: SamplerFlags, page_updates: bool = False
    ) -> SampleOutputs:
        """Copy the plan into the static inputs, replay (or run eagerly on CPU), return outputs.

        ``page_updates``: the plan's page-table writes go in the same copy and the graph's
        first kernel applies them (see ``fits_page_updates``); otherwise the caller has applied
        them. Enqueues on the current stream; does not wait for the GPU.
        """
        i = self._next_staging
        self._next_staging = (i + 1) % len(self._staging)
        event = self._staging_events[i]
        if event is not None:
            event.synchronize()  # the copy four steps ago; long done in steady state
        staging = self._staging[i]
        n_updates = plan.page_updates.shape[1] if page_updates else 0
        host = fill_inputs(
            staging.numpy(),
            plan.slots,
            plan.seq_lens,
            bucket,
            plan.page_updates if n_updates else None,
        )
        # All [INPUT_ROWS, max_bs] in one copy (12 KB at 256 rows): a slice is not contiguous
        # (torch would stage it through pageable memory, which waits for the previous step),
        # and one copy per row, or a separate one for the page writes, was more copy-engine
        # operations between two graphs, each a hand-off the GPU waits on. Columns past the
        # bucket are stale and nothing reads them.
        self.buffers.inputs.copy_(staging, non_blocking=True)
        if event is not None:
            event.record()
        variant = variant_for(flags)
        graph = self.graphs.get((bucket, variant))
        if graph is not None:
            # Backends that plan on the host (flashinfer) refresh their static metadata here.
            self.runner.attn.prepare_for_replay(bucket, host[SEQ_LENS], host[SLOTS])
            graph.replay()
        else:
            slots, positions, seq_lens = self.buffers.views(bucket)
            r = self.runner
            r.ops.scatter_page_updates(r.page_table, self.buffers.inputs[UPDATES:, :bucket])
            r.decode_forward(
                slots,
                positions,
                seq_lens,
                self._out_views[bucket],
                variant,
                r._decode_bound(plan),
                seq_lens_host=host[SEQ_LENS],
            )
        return self._out_views[bucket]


def pad_waste(buckets: list[int], batch_sizes: np.ndarray) -> float:
    """Fraction of replayed rows that are padding, for a distribution of batch sizes."""
    real = padded = 0
    for b in batch_sizes:
        bk = bucket_for(buckets, int(b))
        if bk is not None:
            real += int(b)
            padded += bk
    return 1.0 - real / padded if padded else 0.0
