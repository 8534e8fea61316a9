"""The wire format between the API process and the engine-core process.

Two ZMQ PUSH/PULL pipes over ``ipc://`` sockets in a private temporary directory: one carries
requests to the engine core, the other carries its replies back. Every message is one msgpack
array whose first item is a :class:`Msg` tag. Outputs carry only what is new since the previous
step (text and ids deltas), so a message's size does not grow with the length of a generation.

API -> core::

    [ADD, request_id, prompt_ids, sampling_params_kwargs, cache_salt]
    [ABORT, [request_id, ...]]
    [STATS, seq]
    [SHUTDOWN]

core -> API::

    [READY, info]                          once, after the model has loaded
    [ACKS, [[request_id, reject], ...]]    reject: None, or [RejectKind, message]
    [OUTPUTS, [output, ...]]               one per engine step that produced something
    [STATS_REPLY, seq | None, stats]       seq None: a periodic heartbeat
    [FATAL, message]                       the engine failed; the process is exiting

An ``output`` is ``[request_id, finished, error, [choice, ...], num_cached_tokens]`` and a
``choice`` is
``[index, delta_text, delta_token_ids, delta_logprobs, finish_reason, stop_reason]``, where
``delta_logprobs`` is None or ``[[token_id, logprob, [[top_id, top_logprob], ...]], ...]``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from graphrt.request import RequestOutput, TokenLogprob


class Msg(enum.IntEnum):
    ADD = 0
    ABORT = 1
    STATS = 2
    SHUTDOWN = 3
    READY = 10
    ACKS = 11
    OUTPUTS = 12
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


def encode_output(out: RequestOutput) -> list[Any]:
    """A request's progress since its previous output, in wire form. Choices that made no
    progress and are not finishing are left out."""
    choices = []
    for c in out.outputs:
        if not (c.delta_token_ids or c.delta_text or c.finish_reason is not None):
            continue
        lps = None
        if c.delta_logprobs is not None:
            lps = [[t.token_id, t.logprob, [list(p) for p in t.top]] for t in c.delta_logprobs]
        choices.append(
            [
                c.index,
                c.delta_text,
                list(c.delta_token_ids),
                lps,
                c.finish_reason,
                c.stop_reason,
            ]
        )
    return [out.request_id, out.finished, out.error, choices, out.num_cached_tokens]


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


def decode_output(raw: list[Any]) -> OutputDelta:
    rid, finished, error, choices, num_cached = raw
    decoded = []
    for index, text, ids, lps, finish_reason, stop_reason in choices:
        logprobs = None
        if lps is not None:
            logprobs = [TokenLogprob(t, lp, [(i, v) for i, v in top]) for t, lp, top in lps]
        decoded.append(ChoiceDelta(index, text, ids, logprobs, finish_reason, stop_reason))
    return OutputDelta(rid, finished, error, decoded, num_cached)
