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
    if req.first_token_time is None:
        req.first_token_time = time.monotonic()
    req.output_ids.append(token)
    p = req.params
    if req.logprobs is not None and logprob is not None:
        k = p.logprobs or 0
        top = list(zip(top_ids[:k], top_logprobs[:k])) if k else []
        req.logprobs.append(TokenLogprob(token, float(logprob), top))
    n_out = len(req.output_ids)
    if token in p.stop_token_ids:
        _finish(req, FinishReason.STOP, token)
    elif token in req.eos_ids and not p.ignore_eos:
        _finish(req, FinishReason.STOP, None)
    elif req.detokenizer is not None:
        delta = req.detokenizer.step([token])
        # Stop strings count only once min_tokens outputs exist, as in vLLM.
        if req.stop_matcher is not None and n_out >= p.min_tokens:
            safe, stopped = req.stop_matcher.feed(delta)
            req.append_text(safe)
            if stopped:
                _finish(req, FinishReason.STOP, req.stop_matcher.matched)
                return
        else:
            req.append_text(delta)
    if req.finish_reason is None and len(req.prompt_ids) + n_out >= req.max_len:
        _finish(req, FinishReason.LENGTH, None)
    if req.finish_reason is not None:
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


def completion_output(req: Request) -> CompletionOutput:
    """The request's output as of now; its deltas run from the previous call."""
    out = CompletionOutput(req, req.emitted_ids, req.emitted_text)
    req.emitted_ids = len(req.output_ids)
    req.emitted_text = req.text_len
    return out


def request_output(
    request_id: str,
    children: list[Request],
    prompt: str | None,
    prompt_ids: list[int],
    finished: bool,
) -> RequestOutput:
    """One ``RequestOutput`` for a request and its ``n`` completions. Runs for every streaming
    request every step, so the final-only parts (error, metrics) are built only at the end."""
    outs = [completion_output(c) for c in children]
    if not finished:
        return RequestOutput(request_id, prompt, prompt_ids, outs, False)
    errors = [c.error for c in children if c.error]
    metrics = {"arrival_time": children[0].arrival_time}
    ttfts = [c.first_token_time for c in children if c.first_token_time is not None]
    if ttfts:
        metrics["first_token_time"] = min(ttfts)
    finish = [c.finish_time for c in children if c.finish_time is not None]
    if finish:
        metrics["finish_time"] = max(finish)
    return RequestOutput(
        request_id, prompt, prompt_ids, outs, True, errors[0] if errors else None, metrics
    )
