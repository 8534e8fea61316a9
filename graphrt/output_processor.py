"""The text side: turns the core's sampled ids into what users read.

The engine core deals in token ids only (``Engine.core_step``): it appends each row's id, ends
requests on id conditions (EOS, ``stop_token_ids``, ``max_tokens``) and hands over one
:class:`StepTokens` per step. :class:`OutputProcessor` does everything else, per completion:
incremental detokenization, stop strings, logprob records, metrics, and the ``RequestOutput``
objects of ``n``-completion groups (streamed every step, or once at the end).

A stop string is found here, after the core has moved on: ``process`` returns the completions
it ended so that their owner aborts them in the core, and it ignores the ids the core sampled
for them after the stop, so outputs end exactly where a synchronous check would have ended
them. In the server each API process runs one for its own requests
(:class:`~graphrt.serve.engine_client.EngineClient`), so the engine's process does no text
work; the in-process :class:`~graphrt.engine.Engine` runs it through a
:class:`~graphrt.text_thread.TextSide`, on a thread of its own by default.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graphrt.request import CompletionOutput, FinishReason, RequestOutput, TokenLogprob
from graphrt.sampling_params import SamplingParams

# Rows of a step the in-process engine's text thread works through before it offers the GIL
# to another thread (``_yield_gil``). A thread that wakes from a GIL-free wait (the step thread
# on a step's ``copy_done``, the launcher on its queue) otherwise tends to wait until the text
# thread has finished the whole step's Python work, 0.35 ms at batch 256 on the CPU VM and
# 0.68 ms on the H100's host: CPython hands the GIL over at a blocking call or after its 5 ms
# switch interval. On the VM (real detokenizers, 256 streaming rows a step, a 0.2 ms GIL-free
# wait on the other thread), that wait overran by 165-172 us with no yield, 105 us with a yield
# every 8 rows and 80 us every 4, against 73 us with no text thread at all; the text thread's
# own time went from 0.35 to 0.42 ms a step. ``time.sleep(0)`` hands over surely but sleeps
# about 70 us (the timer slack) each time: 1.5 ms a step at 16 rows.
TEXT_THREAD_YIELD_ROWS = 4


# Releases the GIL and gives up the CPU for a moment, so a thread waiting for the GIL can take
# it: ``os.sched_yield`` runs without the GIL; where it is missing, ``sleep(0)``.
_yield_gil: Callable[[], None] = getattr(os, "sched_yield", None) or functools.partial(
    time.sleep, 0
)


if TYPE_CHECKING:
    from graphrt.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


def completion_ids(request_id: str, n: int) -> list[str]:
    """The ids of a request's ``n`` completions, as the core and the text side both name them."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


@dataclass(slots=True)
class CoreFinish:
    """Why the core ended a completion: its reason, the stop id (``STOP`` by a stop token id,
    else None) and, for ``ERROR``, the message."""

    reason: FinishReason
    stop_reason: int | None = None
    error: str | None = None


@dataclass(slots=True)
class StepTokens:
    """What one engine step (``step_id``) produced, as arrays: row ``r`` gave completion
    ``seq_ids[r]`` the token ``ids[r]`` (with ``logprobs[r]`` and its top alternatives when
    asked for).
    ``finished`` holds the completions the core ended this step, with or without a token (a
    failed step, a request that could not be recomputed), keyed by completion id."""

    step_id: int = -1
    seq_ids: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    finished: dict[str, CoreFinish] = field(default_factory=dict)
    # Prompt tokens the prefix cache served, by request id: set once, with the request's first
    # token (or its failure).
    cached: dict[str, int | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.seq_ids or self.finished)


class SequenceText:
    """One completion as the user sees it: ids, text, logprobs, why it finished.

    Append-only until it finishes, so a :class:`~graphrt.request.CompletionOutput` is a cheap
    snapshot (lengths) rather than a copy.
    """

    __slots__ = (
        "detokenizer",
        "emitted_ids",
        "emitted_text",
        "error",
        "finish_reason",
        "finish_time",
        "first_token_time",
        "index",
        "logprobs",
        "min_tokens",
        "num_logprobs",
        "output_ids",
        "request_id",
        "stop_matcher",
        "stop_reason",
        "text_len",
        "text_parts",
    )

    def __init__(
        self,
        request_id: str,
        index: int,
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer | None = None,
        stop_matcher: StopStringMatcher | None = None,
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.min_tokens = params.min_tokens
        self.num_logprobs = params.logprobs or 0
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.detokenizer = detokenizer
        self.stop_matcher = stop_matcher
        self.output_ids: list[int] = []
        # Emitted text (stop strings held back until disambiguated), as appended pieces:
        # joining only when read keeps appends O(1) instead of copying the text every token.
        self.text_parts: list[str] = []
        self.text_len = 0
        self.emitted_ids = 0  # ids already reported to the user
        self.emitted_text = 0  # chars of text already reported
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append_text(self, piece: str) -> None:
        if piece:
            self.text_parts.append(piece)
            self.text_len += len(piece)

    def text_upto(self, n: int) -> str:
        """The first ``n`` characters of the emitted text."""
        if len(self.text_parts) > 1:
            self.text_parts[:] = ["".join(self.text_parts)]
        return self.text_parts[0][:n] if self.text_parts else ""

    @property
    def text(self) -> str:
        return self.text_upto(self.text_len)

    def append(
        self,
        token: int,
        logprob: float | None,
        top_ids: list[int] | None,
        top_lps: Any,
        text: bool = True,
    ) -> bool:
        """Append one sampled token: its logprob record and (unless ``text`` is False: a stop
        token id, whose text is never shown) its text. Returns True when a stop string ends the
        completion here (the text is cut at it; the caller aborts the core's request)."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        out = self.output_ids
        out.append(token)
        if logprob is not None and self.logprobs is not None:
            k = self.num_logprobs
            top = list(zip(top_ids[:k], top_lps[:k])) if k else []
            self.logprobs.append(TokenLogprob(token, float(logprob), top))
        detok = self.detokenizer
        if detok is None or not text:
            return False
        delta = detok.step_one(token)
        matcher = self.stop_matcher
        if matcher is None:
            if delta:
                self.text_parts.append(delta)
                self.text_len += len(delta)
            return False
        if len(out) < self.min_tokens:  # stop strings count from min_tokens, as vLLM
            self.append_text(delta)
            return False
        safe, stopped = matcher.feed(delta)
        self.append_text(safe)
        if stopped:  # the matcher cut the text at the stop string: nothing to flush
            self._finish(FinishReason.STOP, matcher.matched)
        return stopped

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """End the completion for a reason the core decided, releasing the text held back (an
        unfinished character, a possible stop-string prefix)."""
        self._finish(reason, stop_reason)
        tail = self.detokenizer.flush() if self.detokenizer is not None else ""
        if self.stop_matcher is None:
            self.append_text(tail)
            return
        safe, stopped = self.stop_matcher.feed(tail)
        self.append_text(safe if stopped else safe + self.stop_matcher.flush())

    def fail(self, message: str) -> None:
        self.error = message
        self._finish(FinishReason.ERROR, None)

    def _finish(self, reason: FinishReason, stop_reason: str | int | None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finish_time = time.monotonic()


@dataclass(eq=False)
class TextGroup:
    """A user request's text state: its ``n`` completions share a prompt and an id."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[SequenceText]
    stream: bool
    arrival_time: float
    num_cached_tokens: int | None = None

    @property
    def single(self) -> bool:
        return len(self.seqs) == 1


class OutputProcessor:
    """The text side of every request of one engine (or one API process).

    ``register(new_group(...))`` adds a request's completions; ``process`` applies one step's
    :class:`StepTokens` and returns the outputs of the requests that progressed or finished,
    in the order their rows came; ``drop`` forgets a request (aborted by its user).
    """

    def __init__(self, tokenizer: Tokenizer | None, yield_rows: int = 0) -> None:
        """``yield_rows``: on a thread beside the engine's step thread, give up the GIL after
        every that many rows of a step (0: never). See :data:`TEXT_THREAD_YIELD_ROWS`."""
        if yield_rows < 0:
            raise ValueError(f"yield_rows must be >= 0, got {yield_rows}")
        self.tokenizer = tokenizer
        self.yield_rows = yield_rows
        self._groups: dict[str, TextGroup] = {}
        self._seqs: dict[str, tuple[SequenceText, TextGroup]] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def new_group(
        self,
        request_id: str,
        seq_ids: list[str],
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        stream: bool,
        arrival_time: float | None = None,
    ) -> TextGroup:
        """A request's text state, not registered yet (``register``): its detokenizers and stop
        matchers are built here, where a failure can still reach the caller."""
        seqs = [
            SequenceText(sid, i, params, *self._text_state(prompt_ids, params))
            for i, sid in enumerate(seq_ids)
        ]
        return TextGroup(
            request_id,
            prompt,
            list(prompt_ids),
            seqs,
            stream,
            arrival_time if arrival_time is not None else time.monotonic(),
        )

    def register(self, group: TextGroup) -> None:
        """Start processing a request's steps (``new_group``)."""
        self._groups[group.request_id] = group
        for s in group.seqs:
            self._seqs[s.request_id] = (s, group)

    def _text_state(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[IncrementalDetokenizer | None, StopStringMatcher | None]:
        tok = self.tokenizer
        if tok is None:
            return None, None
        detok = tok.new_detokenizer(prompt_ids, skip_special_tokens=params.skip_special_tokens)
        matcher = None
        if params.stop:
            from graphrt.tokenizer import StopStringMatcher

            matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        return detok, matcher

    def sequence(self, seq_id: str) -> SequenceText | None:
        """A completion's text-side state (tests, and the core's failure reports)."""
        entry = self._seqs.get(seq_id)
        return entry[0] if entry is not None else None

    def set_cached_tokens(self, request_id: str, num: int | None) -> None:
        """Record how many prompt tokens the prefix cache served (first admission)."""
        group = self._groups.get(request_id)
        if group is not None and group.num_cached_tokens is None:
            group.num_cached_tokens = num

    def drop(self, request_id: str) -> bool:
        """Forget a request without an output (its user aborted it)."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        for s in group.seqs:
            self._seqs.pop(s.request_id, None)
        return True

    def process(self, step: StepTokens) -> tuple[list[RequestOutput], list[SequenceText]]:
        """Apply one step. Returns the outputs of the requests it touched (streaming requests
        every step, final-only ones once done) and the completions it ended on its own (a stop
        string, or a text error: ``error`` is set), which the core must abort unless it ended
        them in the same step."""
        for rid, num in step.cached.items():
            self.set_cached_tokens(rid, num)
        seqs = self._seqs
        ended: list[SequenceText] = []
        finished = step.finished
        lps = step.logprobs
        ids, top_ids, top_lps = step.ids, step.top_ids, step.top_logprobs
        take = CompletionOutput.take
        outs: list[RequestOutput | None] = []
        # Groups of n > 1 completions are reported once per step, after all their rows: they
        # get a place in ``outs`` when first touched, filled at the end.
        multi: dict[str, tuple[int, TextGroup]] = {}
        every = self.yield_rows
        countdown = every
        # Runs for every row of every step (at batch 256 most of the text side's time): the
        # common streaming row of a single completion builds its output inline.
        for r, sid in enumerate(step.seq_ids):
            if every:
                countdown -= 1
                if not countdown:
                    countdown = every
                    _yield_gil()
            entry = seqs.get(sid)
            if entry is None:
                continue  # dropped (aborted) while its step was in flight
            seq, group = entry
            if seq.finish_reason is not None:
                continue  # ended by a stop string: the core's later ids are trimmed
            f = finished.get(sid) if finished else None
            # The core checked the ids: a stop id or EOS ends the completion before its text.
            text = f is None or f.reason is not FinishReason.STOP
            try:
                if lps is None:
                    stopped = seq.append(ids[r], None, None, None, text)
                else:
                    stopped = seq.append(ids[r], lps[r], top_ids[r], top_lps[r], text)
            except Exception as e:  # a tokenizer or stop-string error fails this one only
                seq.fail(f"{type(e).__name__}: {e}")
                stopped = True
            if stopped:
                ended.append(seq)  # unless the core ended it too, its owner aborts it there
            elif f is not None:
                _apply(seq, f)
            if not group.single:
                _hold_place(group, outs, multi)
            elif seq.finish_reason is not None:
                outs.append(self._output(group))
            elif group.stream:
                outs.append(
                    RequestOutput(
                        group.request_id,
                        group.prompt,
                        group.prompt_ids,
                        [take(seq)],
                        False,
                        num_cached_tokens=group.num_cached_tokens,
                    )
                )
        if finished:
            for sid, f in finished.items():  # ended without a token this step
                entry = seqs.get(sid)
                if entry is None or entry[0].finish_reason is not None:
                    continue
                seq, group = entry
                _apply(seq, f)
                if group.single:
                    outs.append(self._output(group))
                else:
                    _hold_place(group, outs, multi)
        for i, group in multi.values():
            outs[i] = self._output(group)
        return [o for o in outs if o is not None] if multi else outs, ended  # type: ignore[return-value]

    def _output(self, group: TextGroup) -> RequestOutput | None:
        """The output of a group touched this step (forgotten once done), or None for a
        final-only group that is not done yet."""
        seqs = group.seqs
        done = all(s.finish_reason is not None for s in seqs)
        if not done and not group.stream:
            return None
        outs = [CompletionOutput.take(s) for s in seqs]
        if not done:
            return RequestOutput(
                group.request_id,
                group.prompt,
                group.prompt_ids,
                outs,
                False,
                num_cached_tokens=group.num_cached_tokens,
            )
        self.drop(group.request_id)
        errors = [s.error for s in seqs if s.error]
        metrics = {"arrival_time": group.arrival_time}
        ttfts = [s.first_token_time for s in seqs if s.first_token_time is not None]
        if ttfts:
            metrics["first_token_time"] = min(ttfts)
        ends = [s.finish_time for s in seqs if s.finish_time is not None]
        if ends:
            metrics["finish_time"] = max(ends)
        return RequestOutput(
            group.request_id,
            group.prompt,
            group.prompt_ids,
            outs,
            True,
            errors[0] if errors else None,
            metrics,
            group.num_cached_tokens,
        )


def _hold_place(
    group: TextGroup, outs: list[RequestOutput | None], multi: dict[str, tuple[int, TextGroup]]
) -> None:
    # An n > 1 group's output goes where the group was first touched, built after all rows.
    if group.request_id not in multi:
        multi[group.request_id] = (len(outs), group)
        outs.append(None)


def _apply(seq: SequenceText, f: CoreFinish) -> None:
    if f.reason is FinishReason.ERROR:
        seq.fail(f.error or "failed")
    else:
        seq.finish(f.reason, f.stop_reason)
