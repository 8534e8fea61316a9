"""The plan of one step: small host arrays the scheduler fills and the runner ships to the GPU.

Pure Python and numpy. A plan is immutable once submitted; the runner copies what it needs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from graphrt.request import Request

# Ids banned while a request is below ``min_tokens``: its EOS ids and stop_token_ids.
MAX_BANNED_IDS = 32


@dataclass(frozen=True)
class SlotInit:
    """Parameters written into a slot when a request is admitted (or re-admitted)."""

    slot: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    min_pos: int  # stop ids are banned while the sampled token's position is below this
    banned_ids: tuple[int, ...]
    penalty_prompt_ids: tuple[int, ...] | None  # set only when the request uses penalties
    penalty_output_ids: tuple[int, ...] | None


@dataclass(frozen=True)
class SamplerNeeds:
    """The sampler features a step needs: the union over its rows."""

    full: bool = False
    filters: bool = False
    logprobs: bool = False

    def __or__(self, other: SamplerNeeds) -> SamplerNeeds:
        return needs_of(
            self.full or other.full, self.filters or other.filters, self.logprobs or other.logprobs
        )


def needs_of(full: bool, filters: bool, logprobs: bool) -> SamplerNeeds:
    """The one shared instance of each combination, so greedy rows compare by identity."""
    # Normalized to positional bools: functools.cache keys keyword and positional calls apart,
    # so needs_of(full=False, ...) used to return a second, equal instance of GREEDY_NEEDS and
    # every greedy row took the scheduler's slow path for non-greedy needs.
    return _needs_of(bool(full), bool(filters), bool(logprobs))


@functools.cache
def _needs_of(full: bool, filters: bool, logprobs: bool) -> SamplerNeeds:
    return SamplerNeeds(full, filters, logprobs)


GREEDY_NEEDS = needs_of(False, False, False)


@dataclass
class StepPlan:
    """One step over ``B`` sequences and ``T`` tokens.

    Rows are sequences. A decode row feeds one token whose id is already on the GPU (in the
    slot-indexed token buffer, written by the previous step's sampler); ``input_ids`` marks those
    tokens with -1. Prefill rows feed prompt tokens from the host. ``samples[b]`` says whether row
    ``b`` samples a token this step (decode rows and final prefill chunks); the others send their
    sampled id to the dummy slot through ``out_slots``.
    """

    step_id: int
    is_decode: bool
    requests: list[Request]
    samples: np.ndarray  # bool [B]
    slots: np.ndarray  # int64 [B]
    out_slots: np.ndarray  # int64 [B]
    seq_lens: np.ndarray  # int64 [B], KV length after this step
    query_lens: np.ndarray  # int64 [B]
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    page_updates: np.ndarray  # int64 [3, U]: (slot, index in the slot's page row, page)
    slot_inits: list[SlotInit] = field(default_factory=list)
    needs: SamplerNeeds = field(default_factory=SamplerNeeds)
    # int32 [B, words]: each row's allowed-token bitmask (``structured_outputs``), rows without
    # a grammar all ones; None when no row of the step is constrained.
    token_masks: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
