"""The wire format between the API process and the engine-core process.

Two ZMQ PUSH/PULL pipes over ``ipc://`` sockets in a private temporary directory: one carries
requests to the engine core, the other carries its replies back. Every message is one msgpack
array whose first item is a :class:`Msg` tag.

The engine core deals in token ids only: each step it sends every API process the ids its
requests' completions sampled, as arrays. The API process runs the text side
(:class:`~graphrt.output_processor.OutputProcessor`: detokenization, stop strings, logprob
records) with the tokenizer it already loads, and tells the core which completions a stop
string (or a text error) ended. So the text work of every request leaves the engine's process,
and a message's size does not grow with the length of a generation.

API -> core::

    [ADD, request_id, prompt_ids, sampling_params_kwargs, cache_salt]
    [ABORT, [request_id, ...]]
    [END, [[completion_id, finish_reason, error], ...]]   ended by the text side
    [STATS, seq]
    [SHUTDOWN]

core -> API::

    [READY, info]                          once, after the model has loaded
    [ACKS, [[request_id, reject], ...]]    reject: None, or [RejectKind, message]
    [TOKENS, step_id, completion_ids, ids, logprobs, top_ids, top_logprobs, finished, cached]
                                           one per engine step with rows of this API process
    [STATS_REPLY, seq | None, stats]       seq None: a periodic heartbeat
    [FATAL, message]                       the engine failed; the process is exiting

In ``TOKENS``, row ``r`` gave completion ``completion_ids[r]`` the id ``ids[r]``; the three
logprob arrays are None unless a row asked for logprobs. ``finished`` is
``[[completion_id, finish_reason, stop_token_id, error], ...]`` (ended by the core: EOS, a stop
id, length, an error, with or without a token this step) and ``cached`` is
``[[request_id, num_cached_tokens], ...]``, sent once per request.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from graphrt.output_processor import CoreFinish, StepTokens
from graphrt.request import FinishReason, RequestOutput, TokenLogprob


class Msg(enum.IntEnum):
    ADD = 0
    ABORT = 1
    STATS = 2
    SHUTDOWN = 3
    END = 4
    READY = 10
    ACKS = 11
    TOKENS = 12
    STATS_REPLY = 13
    FATAL = 14


class RejectKind(enum.IntEnum):
    """Why the engine core refused a request; the API maps each to an HTTP status."""

    INVALID = 0  # the request can never run as given (400)
    OVERLOADED = 1  # the waiting queue is full (503)
    ERROR = 2  # an unexpected failure while adding it (500)


def pack(msg: Sequence[Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes) -> list[Any]:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)


def encode_tokens(step: StepTokens, rows: list[int] | None = None) -> list[Any]:
    """``step`` as a ``TOKENS`` message, only rows ``rows`` (default all). ``finished`` and
    ``cached`` go whole: the caller splits them per API process beforehand."""
    lps, tids, tlps = step.logprobs, step.top_ids, step.top_logprobs
    if rows is None:
        seq_ids, ids = step.seq_ids, step.ids
    else:
        seq_ids = [step.seq_ids[r] for r in rows]
        ids = [step.ids[r] for r in rows]
        if lps is not None:
            lps, tids, tlps = ([x[r] for r in rows] for x in (lps, tids, tlps))
    finished = [[sid, f.reason.value, f.stop_reason, f.error] for sid, f in step.finished.items()]
    cached = [[rid, num] for rid, num in step.cached.items()]
    return [Msg.TOKENS, step.step_id, seq_ids, ids, lps, tids, tlps, finished, cached]


def decode_tokens(msg: list[Any]) -> StepTokens:
    """A ``TOKENS`` message back as :class:`StepTokens`."""
    _, step_id, seq_ids, ids, lps, tids, tlps, finished, cached = msg
    return StepTokens(
        step_id=step_id,
        seq_ids=seq_ids,
        ids=ids,
        logprobs=lps,
        top_ids=tids,
        top_logprobs=tlps,
        finished={
            sid: CoreFinish(FinishReason(reason), stop, error)
            for sid, reason, stop, error in finished
        },
        cached=dict(cached),
    )


@dataclass(slots=True)
class ChoiceDelta:
    """What one of a request's completions produced in one step (API side)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass(slots=True)
class OutputDelta:
    """One engine request's progress in one step (API side)."""

    request_id: str
    finished: bool
    error: str | None
    choices: list[ChoiceDelta]
    num_cached_tokens: int | None = None  # prompt tokens served by the prefix cache


def delta_of(out: RequestOutput) -> OutputDelta:
    """A request's progress since its previous output (API side). Choices that made no
    progress and are not finishing are left out."""
    choices = [
        ChoiceDelta(
            c.index,
            c.delta_text,
            list(c.delta_token_ids),
            c.delta_logprobs,
            c.finish_reason,
            c.stop_reason,
        )
        for c in out.outputs
        if c.delta_token_ids or c.delta_text or c.finish_reason is not None
    ]
    return OutputDelta(out.request_id, out.finished, out.error, choices, out.num_cached_tokens)
