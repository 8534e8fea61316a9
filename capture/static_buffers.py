"""Every input and output of the decode graphs, allocated once for the largest bucket.

A replay never allocates and enqueues nothing but the graph. The launcher writes a step's
slots, positions and sequence lengths into a slot of a pinned ring (``StepIO``; rows past the
real batch point at the dummy slot, which maps to the dummy page); the graph's first kernel
reads that slot straight from host memory into ``inputs``, and its last kernel writes the
sampled ids straight into the slot's ids row (``kernels.triton_step_io``). Everything else a
graph reads is slot-indexed runner state (token buffer, page table, sampling parameters),
gathered inside the graph. The same ring slot carries the step's page-table writes, as (slot,
column, page) columns of the last three rows (a negative slot: no write), which the first
kernel applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphrt.host_copy import device_view
from graphrt.memory.page_allocator import DUMMY_SLOT
from graphrt.sampling import SampleOutputs
from graphrt.step_plan import StepPlan

# Rows of ``DecodeBuffers.inputs``: what the graphs read, then the page-table writes.
SLOTS, POSITIONS, SEQ_LENS = 0, 1, 2
UPDATES = 3  # rows 3, 4, 5: slot, column, page of each write; slot -1: no write
INPUT_ROWS = 6
# Slots of the ring the graphs read their inputs from and write their ids to: one per step the
# launcher lets be in flight (processed, running, queued, being launched).
RING_SLOTS = 4


@dataclass
class DecodeBuffers:
    inputs: torch.Tensor  # int64 [INPUT_ROWS, max_bs]: slots, positions, seq_lens, page writes
    out: SampleOutputs
    max_bs: int

    @classmethod
    def allocate(cls, max_bs: int, max_logprobs: int, device: torch.device) -> DecodeBuffers:
        inputs = torch.empty(INPUT_ROWS, max_bs, dtype=torch.int64, device=device)
        inputs.copy_(torch.from_numpy(padding_rows(max_bs)))
        return cls(inputs, SampleOutputs.allocate(max_bs, max_logprobs, device), max_bs)

    def views(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inputs[SLOTS, :bs], self.inputs[POSITIONS, :bs], self.inputs[SEQ_LENS, :bs]


class StepIOError(RuntimeError):
    """A ring slot of ``StepIO`` was handed out while a step still held it."""


class StepIO:
    """The pinned ring the decode graphs read their inputs from and write their ids to.

    Slot ``k % slots`` belongs to the k-th graph step since capture. The device counter ``pos``
    (advanced by each replay's last kernel) and the host counter ``next`` (advanced by
    ``StepGraph.replay``) count the same replays, so the host knows which slot a step uses
    without reading ``pos``. The graph tags the ids row with its count, which the host checks
    when it reads the ids (``StepIOLease.check``), so counts that drifted apart fail loudly.

    A step holds its slot (``lease``) from its launch until its ids have been read; the
    launcher's pool lets at most ``slots`` steps be unreleased at once, so a slot is never
    handed out while held, and ``slot_inputs`` and ``lease`` raise if it would be.
    """

    def __init__(
        self,
        slots: int,
        max_bs: int,
        device: torch.device,
        padding: np.ndarray | None = None,
        max_ids: int | None = None,
    ) -> None:
        """``padding``: ``[rows, columns]`` the slots start as (default: ``padding_rows(max_bs)``,
        the decode layout); ``max_ids``: ids a step returns at most (default ``max_bs``)."""
        pin = device.type == "cuda"
        self.slots = slots
        if padding is None:
            padding = padding_rows(max_bs)
        rows, cols = padding.shape
        # Column-major int32 (a column's rows together): a bucket's columns are one contiguous
        # run of host memory for the graph's first kernel to read over PCIe.
        self.inputs = torch.empty(slots, cols, rows, dtype=torch.int32, pin_memory=pin)
        self._padding = torch.from_numpy(padding.T.astype(np.int32))
        self.inputs.copy_(self._padding.expand(slots, -1, -1))
        # Each row: the ids, then the tag (the graph step count that wrote them).
        n_ids = max_bs if max_ids is None else max_ids
        self.ids = torch.full((slots, n_ids + 1), -1, dtype=torch.int64, pin_memory=pin)
        # What the graphs' kernels take: the same memory, as CUDA tensors.
        self.inputs_dev = device_view(self.inputs, device) if pin else self.inputs
        self.ids_dev = device_view(self.ids, device) if pin else self.ids
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self.next = 0
        # [rows, columns] views, as fill_inputs and fill_mixed_inputs write them.
        self._inputs_np = [self.inputs[i].numpy().T for i in range(slots)]
        # Each slot's whole row (ids, then tag) and its ids alone, made once: a lease per step.
        self._rows_np = [self.ids[i].numpy() for i in range(slots)]
        self._ids_np = [row[:-1] for row in self._rows_np]
        self._holder: list[int | None] = [None] * slots

    def reset(self) -> None:
        """Restart both counters (after capture, whose warm-up runs advanced ``pos``)."""
        self.pos.zero_()
        self.next = 0

    def slot_inputs(self) -> tuple[int, np.ndarray]:
        """The count of the next replay (it uses slot ``count % slots``) and that slot's host
        inputs array to fill."""
        k = self.next
        i = k % self.slots
        if self._holder[i] is not None:
            raise StepIOError(
                f"ring slot {i} is still held by step {self._holder[i]}: more steps in flight "
                f"than the {self.slots} slots"
            )
        return k, self._inputs_np[i]

    def lease(self, count: int, step_id: int) -> StepIOLease:
        """Hold the slot of graph step ``count`` for ``step_id`` until the lease is released."""
        i = count % self.slots
        if self._holder[i] is not None:
            raise StepIOError(f"ring slot {i} is still held by step {self._holder[i]}")
        self._holder[i] = step_id
        return StepIOLease(self, count, step_id, self._rows_np[i], self._ids_np[i])

    def _release(self, i: int, step_id: int) -> None:
        if self._holder[i] != step_id:
            raise StepIOError(
                f"step {step_id} released ring slot {i}, held by step {self._holder[i]}"
            )
        self._holder[i] = None

    def stage_padding(self) -> None:
        """Reset every slot to the padding it started as, so that a replay touches only the
        dummy slot and page whatever the counters say. For benchmarks, with no step in flight."""
        self.inputs.copy_(self._padding.expand(self.slots, -1, -1))

    def stage_all(self, slots: np.ndarray, seq_lens: np.ndarray, bucket: int) -> None:
        """Write one decode batch (no page writes) into every ring slot, so that replays read
        it whatever the counters say. For benchmarks and tests, with no step in flight."""
        for arr in self._inputs_np:
            fill_inputs(arr, slots, seq_lens, bucket)


class StepIOLease:
    """A graph step's hold on its ring slot: its sampled ids, once its ``copy_done`` fired."""

    __slots__ = ("_held", "_io", "_row", "count", "ids", "slot", "step_id")

    def __init__(
        self, io: StepIO, count: int, step_id: int, row: np.ndarray, ids: np.ndarray
    ) -> None:
        self._io = io
        self.count = count
        self.slot = count % io.slots
        self.step_id = step_id
        self._row = row  # the slot's ids row, tag last
        self.ids = ids  # the same row's ids (numpy view of the pinned memory)
        self._held = True

    def check(self) -> None:
        """After the step's ``copy_done``: raise if its ids row was written by another graph
        step than this one (the device's count and the host's drifted apart)."""
        tag = int(self._row[-1])
        if tag != self.count:
            raise StepIOError(
                f"step {self.step_id}: ring slot {self.slot} holds the ids of graph step {tag}, "
                f"not of graph step {self.count}; the device's count of graph steps and the "
                "host's are out of step (a decode graph replayed other than through "
                "StepGraph.replay?)"
            )

    def release(self) -> None:
        if self._held:
            self._held = False
            self._io._release(self.slot, self.step_id)


def padding_rows(n: int) -> np.ndarray:
    """``[INPUT_ROWS, n]`` inputs of padding rows: the dummy slot, position 0, one token of
    context, and no page writes."""
    rows = np.zeros((INPUT_ROWS, n), dtype=np.int64)
    rows[SLOTS] = DUMMY_SLOT
    rows[SEQ_LENS] = 1
    rows[UPDATES] = -1
    return rows


def fill_inputs(
    staging: np.ndarray,
    slots: np.ndarray,
    seq_lens: np.ndarray,
    bucket: int,
    page_updates: np.ndarray | None = None,
) -> np.ndarray:
    """Write a decode batch, padded to ``bucket`` rows, into ``staging[:3, :bucket]``, and its
    ``[3, n]`` page writes (slot, column, page; ``n <= bucket``) into the first ``n`` of the
    bucket's columns of ``staging[UPDATES:]``, the rest marked empty. Returns the graph's rows,
    ``staging[:3, :bucket]``."""
    # In place, with no temporaries: this runs for every replayed step.
    b = slots.shape[0]
    staging[SLOTS, :b] = slots
    np.subtract(seq_lens, 1, out=staging[POSITIONS, :b])
    staging[SEQ_LENS, :b] = seq_lens
    staging[SLOTS, b:bucket] = DUMMY_SLOT
    staging[POSITIONS, b:bucket] = 0
    staging[SEQ_LENS, b:bucket] = 1
    n = 0 if page_updates is None else page_updates.shape[1]
    if n:
        staging[UPDATES:, :n] = page_updates
    staging[UPDATES, n:bucket] = -1
    return staging[:UPDATES, :bucket]


# ---- mixed steps (capture.mixed_graph_runner) ----------------------------------------------------

# Rows of a mixed step's inputs (``MixedBuffers.inputs`` and its ring slots), over ``T + 1``
# columns for token bucket ``T``: three per token, four per row (``R <= T`` rows, and
# ``R + 1`` offsets), then the page-table writes as in the decode layout.
M_IDS, M_POSITIONS, M_TOKEN_SLOTS = 0, 1, 2  # per token; an id of -1: the slot's last sample
M_SLOTS, M_OUT_SLOTS, M_SEQ_LENS, M_CU_Q = 3, 4, 5, 6  # per row; cu_q has R + 1 entries
M_UPDATES = 7  # rows 7, 8, 9: slot, column, page of each write; slot -1: no write
MIXED_ROWS = 10


def mixed_padding(columns: int) -> np.ndarray:
    """``[MIXED_ROWS, columns]`` inputs of padding: tokens of id 0 at position 0 in the dummy
    slot (so their K/V go to the dummy page), rows of the dummy slot that feed no token, and no
    page writes."""
    rows = np.zeros((MIXED_ROWS, columns), dtype=np.int64)
    rows[M_TOKEN_SLOTS] = DUMMY_SLOT
    rows[M_SLOTS] = DUMMY_SLOT
    rows[M_OUT_SLOTS] = DUMMY_SLOT
    rows[M_UPDATES] = -1
    return rows


@dataclass
class MixedBuffers:
    """The device copy of a mixed step's inputs, and the sampler's outputs, for the largest
    token bucket (``max_tokens`` tokens in ``max_rows`` rows)."""

    inputs: torch.Tensor  # int64 [MIXED_ROWS, max_tokens + 1]
    out: SampleOutputs

    @classmethod
    def allocate(
        cls, max_tokens: int, max_rows: int, max_logprobs: int, device: torch.device
    ) -> MixedBuffers:
        inputs = torch.from_numpy(mixed_padding(max_tokens + 1)).to(device)
        out = SampleOutputs.allocate(max_rows, max_logprobs, device)
        return cls(inputs, out)

    def views(self, tokens: int, rows: int) -> tuple[torch.Tensor, ...]:
        """(ids, positions, token slots) over ``tokens``; (slots, out slots, seq lens) over
        ``rows``; cu_q over ``rows + 1``."""
        x = self.inputs
        return (
            x[M_IDS, :tokens],
            x[M_POSITIONS, :tokens],
            x[M_TOKEN_SLOTS, :tokens],
            x[M_SLOTS, :rows],
            x[M_OUT_SLOTS, :rows],
            x[M_SEQ_LENS, :rows],
            x[M_CU_Q, : rows + 1],
        )


def fill_mixed_inputs(
    staging: np.ndarray,
    plan: StepPlan,
    tokens: int,
    rows: int,
    page_updates: np.ndarray | None = None,
) -> None:
    """Write a step's plan, padded to ``tokens`` tokens in ``rows`` rows, into the first
    ``tokens + 1`` columns of ``staging`` (``[MIXED_ROWS, W]``), with its ``[3, n]`` page writes
    (``n <= tokens + 1``) in the first ``n`` columns of the update rows."""
    t, b = plan.num_tokens, plan.batch_size
    staging[M_IDS, :t] = plan.input_ids
    staging[M_IDS, t:tokens] = 0
    staging[M_POSITIONS, :t] = plan.positions
    staging[M_POSITIONS, t:tokens] = 0
    staging[M_TOKEN_SLOTS, :t] = np.repeat(plan.slots, plan.query_lens)
    staging[M_TOKEN_SLOTS, t:tokens] = DUMMY_SLOT
    staging[M_SLOTS, :b] = plan.slots
    staging[M_SLOTS, b:rows] = DUMMY_SLOT
    staging[M_OUT_SLOTS, :b] = plan.out_slots
    staging[M_OUT_SLOTS, b:rows] = DUMMY_SLOT
    staging[M_SEQ_LENS, :b] = plan.seq_lens
    staging[M_SEQ_LENS, b:rows] = 0
    staging[M_CU_Q, 0] = 0
    np.cumsum(plan.query_lens, out=staging[M_CU_Q, 1 : b + 1])
    staging[M_CU_Q, b + 1 : rows + 1] = t  # padding rows feed no token
    n = 0 if page_updates is None else page_updates.shape[1]
    if n:
        staging[M_UPDATES:, :n] = page_updates
    staging[M_UPDATES, n : tokens + 1] = -1
