"""Every input and output of the decode graphs, allocated once for the largest bucket.

A replay never allocates: the launcher copies a step's slots, positions and sequence lengths
into ``inputs`` (rows past the real batch point at the dummy slot, which maps to the dummy page)
and the graph writes ``out``. Everything else a graph reads is slot-indexed runner state (token
buffer, page table, sampling parameters), gathered inside the graph. The same copy carries the
step's page-table writes, as (slot, column, page) columns of the last three rows (a negative
slot: no write), which the graph's first kernel applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphrt.memory.page_allocator import DUMMY_SLOT
from graphrt.sampling import SampleOutputs

# Rows of ``DecodeBuffers.inputs``: what the graphs read, then the page-table writes.
SLOTS, POSITIONS, SEQ_LENS = 0, 1, 2
UPDATES = 3  # rows 3, 4, 5: slot, column, page of each write; slot -1: no write
INPUT_ROWS = 6


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
