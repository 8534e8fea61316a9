"""The request checks shared by the engine, the mock engine and the server
(``graphrt.validation``): each names the field at fault, and the context length carries
OpenAI's error code."""

from __future__ import annotations

import pytest

from graphrt.errors import RequestRejected
from graphrt.validation import (
    CONTEXT_LENGTH_EXCEEDED,
    RequestLimits,
    check_logprobs,
    check_max_tokens,
    check_n,
    check_prompt,
    check_token_ids,
)

LIMITS = RequestLimits(vocab_size=100, max_model_len=50, max_logprobs=5, max_n=4)
SERVER = RequestLimits(
    vocab_size=100,
    max_model_len=50,
    max_logprobs=5,
    max_n=4,
    max_prompt_tokens=20,
    max_output_tokens=10,
    max_n_setting="the server limit max_n",
)


def _rejected(fn, *args, **kw) -> RequestRejected:
    with pytest.raises(RequestRejected) as e:
        fn(*args, **kw)
    return e.value


def test_prompt_checks() -> None:
    check_prompt([0, 99], LIMITS)  # fine
    e = _rejected(check_prompt, [], LIMITS, "messages")
    assert e.param == "messages" and "empty" in str(e)
    e = _rejected(check_prompt, [1, 100], LIMITS)
    assert e.param == "prompt" and "token id 100 is outside the vocabulary [0, 100)" in str(e)
    assert _rejected(check_token_ids, [-1], 100, "tokens").param == "tokens"
    e = _rejected(check_prompt, [1] * 50, LIMITS)
    assert e.code == CONTEXT_LENGTH_EXCEEDED and "context length" in str(e)
    check_prompt([1] * 49, LIMITS)  # one token left to generate
    e = _rejected(check_prompt, [1] * 21, SERVER)
    assert "max_prompt_tokens=20" in str(e) and e.code is None


def test_max_tokens_checks() -> None:
    assert check_max_tokens(10, None, LIMITS) == 50
    assert check_max_tokens(10, 40, LIMITS) == 50
    e = _rejected(check_max_tokens, 10, 41, LIMITS)
    assert e.param == "max_tokens" and e.code == CONTEXT_LENGTH_EXCEEDED
    e = _rejected(check_max_tokens, 10, 11, SERVER)
    assert e.param == "max_tokens" and "max_output_tokens=10" in str(e)


def test_logprobs_and_n_checks() -> None:
    check_logprobs(None, LIMITS)
    check_logprobs(5, LIMITS)
    e = _rejected(check_logprobs, 6, LIMITS, "top_logprobs")
    assert e.param == "top_logprobs" and "max_logprobs=5" in str(e)
    check_n(4, LIMITS)
    assert "n must be >= 1" in str(_rejected(check_n, 0, LIMITS))
    assert "n=2 x 3 prompts exceeds max_n=4" in str(_rejected(check_n, 2, LIMITS, prompts=3))
    assert "the server limit max_n=4" in str(_rejected(check_n, 5, SERVER))


@pytest.mark.parametrize("field", ["vocab_size", "max_model_len", "max_n", "max_logprobs"])
def test_limits_are_validated(field: str) -> None:
    kw = dict(vocab_size=100, max_model_len=50, max_logprobs=5, max_n=4)
    kw[field] = -1
    with pytest.raises(ValueError, match=field):
        RequestLimits(**kw)


def test_the_engine_rejects_with_the_shared_checks(tiny_model_factory) -> None:
    """One path: the engine's rejection of a too-long prompt is the shared check's, with its
    field and code, and the engine keeps serving."""
    from graphrt import Engine, SamplingParams

    eng = Engine(str(tiny_model_factory("LlamaForCausalLM")), show_progress=False, max_model_len=64)
    want = _rejected(check_prompt, [1] * 64, eng.request_limits)
    got = _rejected(eng.add_request, None, [1] * 64, SamplingParams())
    assert str(got) == str(want) and got.code == CONTEXT_LENGTH_EXCEEDED
    assert _rejected(eng.add_request, None, [1], SamplingParams(n=300)).param == "n"
    assert eng.generate([[1, 2]], SamplingParams(max_tokens=2))[0].finished
    eng.shutdown()
