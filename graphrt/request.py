"""A request's state inside the engine, and the outputs handed back to users."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graphrt.sampling_params import SamplingParams
from graphrt.step_plan import GREEDY_NEEDS, SamplerNeeds

if TYPE_CHECKING:
    from graphrt.output_processor import SequenceText
    from graphrt.structured_outputs import GrammarMatcherState


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
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_pending: int = 0
    # Tokens to prefill: the prompt, or prompt + outputs when recomputing after preemption.
    prefill_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    # Prefill chunks launched that sample nothing and whose step has not been processed yet.
    # With num_pending, they keep a preempted request out of admission until every step that
    # wrote its old pages has been seen (the prefix cache indexes pages only then).
    num_chunks_pending: int = 0
    # Prefix cache. A request whose cache_salt differs shares no page with this one.
    cache_salt: str | None = None
    # Prompt tokens whose KV came from the cache at the first admission (vLLM's name).
    num_cached_tokens: int | None = None
    # Leading full pages the prefix index knows (found there, or inserted once their KV was
    # written), and the index node of the last of them: where the next page's key hangs.
    num_indexed_pages: int = 0
    cache_parent: int | str | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    needs: SamplerNeeds = GREEDY_NEEDS
    # ``structured_outputs``: the completion's grammar (compiling, then its matcher).
    grammar: GrammarMatcherState | None = None
    # Sampled ids that end the request: stop_token_ids, and the EOS ids unless ignore_eos.
    # One set, so the per-token check is one lookup (Engine.core_step).
    stop_ids: frozenset[int] = field(init=False, repr=False)
    max_output: int = field(init=False, repr=False)  # outputs that reach max_len

    def __post_init__(self) -> None:
        if not self.prefill_ids:
            self.prefill_ids = list(self.prompt_ids)
        p = self.params
        self.stop_ids = frozenset(p.stop_token_ids) | (
            frozenset() if p.ignore_eos else self.eos_ids
        )
        self.max_output = self.max_len - len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.prefill_ids)

    @property
    def in_flight(self) -> bool:
        return self.num_pending > 0 or self.num_chunks_pending > 0

    def token_ids(self, start: int, end: int) -> list[int]:
        """The ids at positions ``[start, end)`` of prompt + outputs."""
        prompt = self.prompt_ids
        n = len(prompt)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return prompt[start:] + self.output_ids[: end - n]


class CompletionOutput:
    """One of a request's ``n`` completions, as of one step.

    ``text``/``token_ids``/``logprobs`` are cumulative; ``delta_*`` hold what is new since the
    previous output of the same request. Each is computed when read, from a snapshot of the
    completion's append-only text-side state (:class:`~graphrt.output_processor.SequenceText`),
    so producing an output every step costs O(1), not O(length).
    """

    __slots__ = ("_n", "_n0", "_req", "_t", "_t0", "finish_reason", "index", "stop_reason")

    def __init__(self, req: SequenceText, since_ids: int, since_text: int) -> None:
        self._req = req
        self._n = len(req.output_ids)
        self._t = req.text_len
        self._n0 = since_ids
        self._t0 = since_text
        self.index = req.index
        reason = req.finish_reason
        self.finish_reason = None if reason is None else reason.value
        self.stop_reason = req.stop_reason

    @classmethod
    def take(cls, req: SequenceText) -> CompletionOutput:
        """The request's output as of now, with deltas since the previous ``take``; marks what
        it holds as reported. Runs for every streaming row of every step."""
        out = cls(req, req.emitted_ids, req.emitted_text)
        req.emitted_ids = out._n
        req.emitted_text = out._t
        return out

    @property
    def token_ids(self) -> list[int]:
        return self._req.output_ids[: self._n]

    @property
    def text(self) -> str:
        return self._req.text_upto(self._t)

    @property
    def delta_token_ids(self) -> list[int]:
        return self._req.output_ids[self._n0 : self._n]

    @property
    def delta_text(self) -> str:
        return self._req.text_upto(self._t)[self._t0 :]

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        lp = self._req.logprobs
        return None if lp is None else lp[: self._n]

    @property
    def delta_logprobs(self) -> list[TokenLogprob] | None:
        lp = self._req.logprobs
        return None if lp is None else lp[self._n0 : self._n]

    @property
    def cumulative_logprob(self) -> float | None:
        lp = self._req.logprobs
        return None if lp is None else sum(t.logprob for t in lp[: self._n])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, "
            f"token_ids={self.token_ids}, finish_reason={self.finish_reason!r})"
        )


@dataclass(slots=True)  # built for every streaming request every step
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # Prompt tokens whose KV came from the prefix cache (of the first completion when n > 1);
    # None until the request has been admitted.
    num_cached_tokens: int | None = None
