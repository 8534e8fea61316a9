"""Turns a step's sampled ids into request state: append, detokenize, stop checks, outputs.

Runs on the scheduler thread, after the step's ``copy_done``. Pure Python.
"""

from __future__ import annotations

import time

from graphrt.request import (
    CompletionOutput,
    FinishReason,
    Request,
    RequestOutput,
    TokenLogprob,
)


def append_token(
    req: Request,
    token: int,
    logprob: float | None,
    top_ids: list[int] | None,
    top_logprobs: list[float] | None,
) -> None:
    """Append one sampled token and decide whether the request is finished.

    Sets ``req.finish_reason`` (and ``stop_reason``) when it is; the caller frees the request.
    """
    # Runs for every row of every step: locals over repeated attribute chains, and one set test
    # (``req.stop_ids``) for stop ids and EOS together.
    if req.first_token_time is None:
        req.first_token_time = time.monotonic()
    out = req.output_ids
    out.append(token)
    if logprob is not None and req.logprobs is not None:
        k = req.params.logprobs or 0
        top = list(zip(top_ids[:k], top_logprobs[:k])) if k else []
        req.logprobs.append(TokenLogprob(token, float(logprob), top))
    if token in req.stop_ids:
        # A stop token id wins over EOS (an id in both reports itself as the stop reason).
        _finish(req, FinishReason.STOP, token if token in req.params.stop_token_ids else None)
        _flush_text(req)
        return
    detok = req.detokenizer
    if detok is not None:
        delta = detok.step_one(token)
        matcher = req.stop_matcher
        if matcher is None:
            if delta:
                req.text_parts.append(delta)
                req.text_len += len(delta)
        elif len(out) >= req.params.min_tokens:  # stop strings count from min_tokens, as vLLM
            safe, stopped = matcher.feed(delta)
            req.append_text(safe)
            if stopped:  # the matcher cut the text at the stop string: nothing to flush
                _finish(req, FinishReason.STOP, matcher.matched)
                return
        else:
            req.append_text(delta)
    if len(out) >= req.max_output:
        _finish(req, FinishReason.LENGTH, None)
        _flush_text(req)


def _flush_text(req: Request) -> None:
    """At the end: release what the detokenizer (an unfinished character) and the stop matcher
    (a possible stop-string prefix) still hold."""
    tail = req.detokenizer.flush() if req.detokenizer is not None else ""
    if req.stop_matcher is None:
        req.append_text(tail)
        return
    safe, stopped = req.stop_matcher.feed(tail)
    req.append_text(safe if stopped else safe + req.stop_matcher.flush())


def _finish(req: Request, reason: FinishReason, stop_reason: str | int | None) -> None:
    req.finish_reason = reason
    req.stop_reason = stop_reason
    req.finish_time = time.monotonic()


def fail(req: Request, message: str) -> None:
    """Mark a request failed; the caller frees it."""
    req.error = message
    _finish(req, FinishReason.ERROR, None)


def abort(req: Request) -> None:
    _finish(req, FinishReason.ABORT, None)


def request_output(
    request_id: str,
    children: list[Request],
    prompt: str | None,
    prompt_ids: list[int],
    finished: bool,
) -> RequestOutput:
    """One ``RequestOutput`` for a request and its ``n`` completions. Runs for every streaming
    request every step, so the final-only parts (error, metrics) are built only at the end."""
    outs = [CompletionOutput.take(c) for c in children]
    cached = children[0].num_cached_tokens
    if not finished:
        return RequestOutput(request_id, prompt, prompt_ids, outs, False, num_cached_tokens=cached)
    errors = [c.error for c in children if c.error]
    metrics = {"arrival_time": children[0].arrival_time}
    ttfts = [c.first_token_time for c in children if c.first_token_time is not None]
    if ttfts:
        metrics["first_token_time"] = min(ttfts)
    finish = [c.finish_time for c in children if c.finish_time is not None]
    if finish:
        metrics["finish_time"] = max(finish)
    return RequestOutput(
        request_id, prompt, prompt_ids, outs, True, errors[0] if errors else None, metrics, cached
    )
