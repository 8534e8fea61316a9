"""A request's state inside the engine, and the outputs handed back to users."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graphrt.sampling_params import SamplingParams

if TYPE_CHECKING:
    from graphrt.tokenizer import IncrementalDetokenizer, StopStringMatcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"
    ERROR = "error"


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the top alternatives at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)  # identity: queues remove and find requests by object
class Request:
    """One sequence being generated. ``n > 1`` requests become ``n`` of these.

    Positions: the prompt (plus, after a preemption, the outputs so far) is prefilled in chunks;
    ``num_computed`` counts positions whose KV has been *launched* (not necessarily finished).
    ``num_pending`` counts sampled tokens launched but not yet seen on the host: the scheduler runs
    one step ahead, so a request may have one in flight while the next step is planned.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_len: int  # prompt + outputs may not exceed this (max_tokens and the context limit)
    eos_ids: frozenset[int]
    prompt: str | None = None
    group_id: str | None = None
    index: int = 0
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_pending: int = 0
    # Tokens to prefill: the prompt, or prompt + outputs when recomputing after preemption.
    prefill_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None

    detokenizer: IncrementalDetokenizer | None = None
    stop_matcher: StopStringMatcher | None = None
    text: str = ""  # emitted text (stop strings held back until disambiguated)
    emitted_ids: int = 0  # output ids already reported to the user
    emitted_text: int = 0  # chars of ``text`` already reported
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prefill_ids:
            self.prefill_ids = list(self.prompt_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.prefill_ids)

    @property
    def num_tokens_scheduled(self) -> int:
        """Prompt + outputs once every launched step has landed."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def can_sample_more(self) -> bool:
        return self.num_tokens_scheduled < self.max_len

    @property
    def in_flight(self) -> bool:
        return self.num_pending > 0


@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions. ``text``/``token_ids`` are cumulative;
    ``delta_text``/``delta_token_ids`` hold what is new since the previous output."""

    index: int
    text: str
    token_ids: list[int]
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None
    delta_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
