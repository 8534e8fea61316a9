"""Request checks shared by ``Engine.add_request``, the mock engine and the server's API
processes: one place says what a valid prompt, ``max_tokens``, ``logprobs`` and ``n`` are.

Every check raises ``RequestRejected`` with the request field it names (``param``) and, for the
context length, OpenAI's error code, so the server turns it into a 400 body as is. No heavy
imports: API processes run without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from graphrt.errors import RequestRejected

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's error code


@dataclass(frozen=True)
class RequestLimits:
    """What requests are checked against. The server adds its own caps; the engine has none
    (``None``)."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    max_n: int
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    # The setting behind max_n, for messages: the server's max_n, the engine's max_num_seqs.
    max_n_setting: str = "max_n"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_model_len", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"RequestLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"RequestLimits.max_logprobs must be >= 0, got {self.max_logprobs}")


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Every id in ``[0, vocab_size)``."""
    for t in ids:
        if not 0 <= t < vocab_size:
            raise RequestRejected(
                f"{param}: token id {t} is outside the vocabulary [0, {vocab_size})", param=param
            )


def check_prompt(ids: Sequence[int], limits: RequestLimits, param: str = "prompt") -> None:
    """Not empty, every id in the vocabulary, and room left for at least one new token."""
    if not ids:
        raise RequestRejected(f"{param} is empty", param=param)
    check_token_ids(ids, limits.vocab_size, param)
    ctx = limits.max_model_len
    if len(ids) >= ctx:
        raise RequestRejected(
            f"{param} has {len(ids)} tokens; the model's context length (max_model_len) is "
            f"{ctx} tokens, and at least one token must be left to generate",
            param=param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )
    cap = limits.max_prompt_tokens
    if cap is not None and len(ids) > cap:
        raise RequestRejected(
            f"{param} has {len(ids)} tokens, more than the server limit max_prompt_tokens={cap}",
            param=param,
        )


def check_max_tokens(prompt_len: int, max_tokens: int | None, limits: RequestLimits) -> int:
    """The prompt plus ``max_tokens`` within the context length and ``max_output_tokens``;
    returns the request's longest total length (``max_model_len`` when ``max_tokens`` is
    None)."""
    ctx = limits.max_model_len
    if max_tokens is None:
        return ctx
    if prompt_len + max_tokens > ctx:
        raise RequestRejected(
            f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context length (max_model_len) of {ctx} tokens",
            param="max_tokens",
            code=CONTEXT_LENGTH_EXCEEDED,
        )
    cap = limits.max_output_tokens
    if cap is not None and max_tokens > cap:
        raise RequestRejected(
            f"max_tokens={max_tokens} exceeds the server limit max_output_tokens={cap}",
            param="max_tokens",
        )
    return prompt_len + max_tokens


def check_logprobs(logprobs: int | None, limits: RequestLimits, param: str = "logprobs") -> None:
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise RequestRejected(
            f"{param}={logprobs} exceeds max_logprobs={limits.max_logprobs}", param=param
        )


def check_n(n: int, limits: RequestLimits, prompts: int = 1) -> None:
    """``n`` completions of each of ``prompts`` prompts: at least 1, at most ``max_n`` in all."""
    if n < 1:
        raise RequestRejected(f"n must be >= 1, got {n}", param="n")
    if n * prompts > limits.max_n:
        what = f"n={n}" if prompts == 1 else f"n={n} x {prompts} prompts"
        raise RequestRejected(f"{what} exceeds {limits.max_n_setting}={limits.max_n}", param="n")
