"""SamplingParams: bounds of every field, stop normalisation, and cross-field checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphrt.sampling_params import SamplingParams


def test_defaults() -> None:
    p = SamplingParams()
    assert p.n == 1 and p.temperature == 1.0 and p.max_tokens == 16
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.greedy and not p.uses_penalties and not p.uses_filters
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.0  # type: ignore[misc]


VALID: list[tuple[str, Any]] = [
    ("n", 1),
    ("n", 8),
    ("temperature", 0),
    ("temperature", 0.0),
    ("temperature", 7.5),
    ("top_p", 1e-6),
    ("top_p", 1),
    ("top_k", -1),
    ("top_k", 0),
    ("top_k", 50),
    ("min_p", 0.0),
    ("min_p", 1.0),
    ("seed", None),
    ("seed", 0),
    ("seed", 2**64 - 1),
    ("seed", -1),  # OpenAI and vLLM accept any 64-bit seed
    ("max_tokens", None),
    ("max_tokens", 1),
    ("min_tokens", 16),  # equal to the default max_tokens
    ("repetition_penalty", 1e-3),
    ("repetition_penalty", 3),
    ("presence_penalty", -2.0),
    ("presence_penalty", 2),
    ("frequency_penalty", -2),
    ("frequency_penalty", 2.0),
    ("logprobs", None),
    ("logprobs", 0),
    ("logprobs", 20),
    ("stop_token_ids", [0, 5]),
    ("ignore_eos", True),
    ("include_stop_str_in_output", True),
    ("skip_special_tokens", False),
]


@pytest.mark.parametrize(("name", "value"), VALID)
def test_valid_boundary_values(name: str, value: Any) -> None:
    p = SamplingParams(**{name: value})
    got = getattr(p, name)
    assert got == (tuple(value) if isinstance(value, list) else value)


INVALID: list[tuple[str, Any, type[Exception]]] = [
    ("n", 0, ValueError),
    ("n", 1.0, TypeError),
    ("n", True, TypeError),
    ("temperature", -0.01, ValueError),
    ("temperature", math.inf, ValueError),
    ("temperature", math.nan, ValueError),
    ("temperature", "1", TypeError),
    ("temperature", None, TypeError),
    ("top_p", 0, ValueError),
    ("top_p", 0.0, ValueError),
    ("top_p", 1.0001, ValueError),
    ("top_p", -0.5, ValueError),
    ("top_k", -2, ValueError),
    ("top_k", 5.0, TypeError),
    ("min_p", -0.1, ValueError),
    ("min_p", 1.5, ValueError),
    ("seed", -(2**63) - 1, ValueError),
    ("seed", 2**64, ValueError),
    ("seed", 1.0, TypeError),
    ("max_tokens", 0, ValueError),
    ("max_tokens", -5, ValueError),
    ("max_tokens", 16.0, TypeError),
    ("min_tokens", -1, ValueError),
    ("min_tokens", 17, ValueError),  # above the default max_tokens of 16
    ("min_tokens", None, TypeError),
    ("repetition_penalty", 0, ValueError),
    ("repetition_penalty", -1.0, ValueError),
    ("presence_penalty", 2.01, ValueError),
    ("presence_penalty", -2.5, ValueError),
    ("frequency_penalty", 3, ValueError),
    ("frequency_penalty", -2.01, ValueError),
    ("logprobs", -1, ValueError),
    ("logprobs", 1.5, TypeError),
    ("stop", "", ValueError),
    ("stop", ["ok", ""], ValueError),
    ("stop", [1, 2], TypeError),
    ("stop", 5, TypeError),
    ("stop", b"x", TypeError),
    ("stop_token_ids", [-1], ValueError),
    ("stop_token_ids", [True], ValueError),
    ("stop_token_ids", [1.0], ValueError),
    ("stop_token_ids", 7, ValueError),
    ("ignore_eos", 1, TypeError),
    ("include_stop_str_in_output", "yes", TypeError),
    ("skip_special_tokens", None, TypeError),
]


@pytest.mark.parametrize(("name", "value", "exc"), INVALID)
def test_invalid_values_raise_naming_field(name: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=name):
        SamplingParams(**{name: value})


def test_huge_ints_are_refused_with_value_error() -> None:
    # An int too large for a float must not escape as OverflowError from math.isfinite.
    for name in ("temperature", "repetition_penalty", "top_p", "presence_penalty"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: 10**400})


def test_min_tokens_above_max_tokens_rejected() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4
    # Without a max_tokens limit any min_tokens is allowed.
    assert SamplingParams(max_tokens=None, min_tokens=10_000).min_tokens == 10_000


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("###", ("###",)),
        (["a", "b"], ("a", "b")),
        (("a",), ("a",)),
        (None, ()),
        ([], ()),
    ],
)
def test_stop_normalised_to_tuple(stop: Any, expected: tuple[str, ...]) -> None:
    p = SamplingParams(stop=stop)
    assert p.stop == expected
    hash(p)  # stays hashable: tuples, not lists


def test_stop_token_ids_normalised_to_tuple() -> None:
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()


def test_properties() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(presence_penalty=0.1).uses_penalties
    assert SamplingParams(frequency_penalty=-0.1).uses_penalties
    assert SamplingParams(top_k=5).uses_filters
    assert SamplingParams(top_p=0.9).uses_filters
    assert SamplingParams(min_p=0.1).uses_filters
    # top_k=-1 disables top-k, as 0 does.
    assert not SamplingParams(top_k=-1).uses_filters


def test_replace_validates() -> None:
    p = SamplingParams(stop="x")
    assert p.replace(temperature=0.5).temperature == 0.5
    assert p.replace(temperature=0.5).stop == ("x",)
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=2.0)


FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]

# Anything a JSON body or a careless caller might pass.
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.integers(10**308, 10**400),  # ints a float cannot hold
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-3, 3),
    st.text(max_size=4),
    st.binary(max_size=2),
    st.lists(st.one_of(st.integers(-3, 2**65), st.text(max_size=3), st.booleans()), max_size=3),
    st.tuples(st.text(max_size=3)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@settings(max_examples=250, deadline=None)
@given(name=st.sampled_from(FIELDS), value=ANY_VALUE)
def test_any_value_constructs_or_raises_naming_field(name: str, value: Any) -> None:
    try:
        p = SamplingParams(**{name: value})
    except (ValueError, TypeError) as e:
        assert name in str(e)
    else:
        # What was accepted is stored in its canonical form and passes validation again.
        assert p.replace() == p


@settings(max_examples=150, deadline=None)
@given(
    max_tokens=st.one_of(st.none(), st.integers(-2, 50)),
    min_tokens=st.integers(-2, 60),
    temperature=st.floats(-1, 3),
    top_p=st.floats(-0.5, 1.5),
    top_k=st.integers(-3, 10),
)
def test_combinations_obey_each_bound(
    max_tokens: int | None, min_tokens: int, temperature: float, top_p: float, top_k: int
) -> None:
    kw = dict(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
    )
    ok = (
        (max_tokens is None or max_tokens >= 1)
        and min_tokens >= 0
        and (max_tokens is None or min_tokens <= max_tokens)
        and temperature >= 0
        and 0 < top_p <= 1
        and top_k >= -1
    )
    if ok:
        SamplingParams(**kw)
    else:
        with pytest.raises(ValueError):
            SamplingParams(**kw)
