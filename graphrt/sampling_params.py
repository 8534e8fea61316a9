"""Per-request generation settings, with vLLM/OpenAI field names."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

_FIELDS_INT_OR_NONE = ("seed", "max_tokens", "logprobs")

# Temperatures below this are greedy, as in vLLM: dividing fp32 logits by less overflows.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on what a request may generate, with vLLM's names. Exactly one is set:

    - ``json``: a JSON schema (a dict, or its JSON text); the output is an instance of it;
    - ``json_object``: any JSON object (OpenAI's ``{"type": "json_object"}``);
    - ``regex``: the output matches this regular expression;
    - ``grammar``: an EBNF grammar (GBNF dialect, root rule ``root``);
    - ``choice``: the output is exactly one of these strings.

    The schema is stored as JSON text, so equal schemas compare and hash equal and share one
    compiled grammar.
    """

    json: str | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise TypeError(
                    "structured_outputs.json must be a JSON schema (an object), got "
                    f"{type(schema).__name__}"
                )
            # Key order kept: a schema's property order is the order the output follows.
            object.__setattr__(self, "json", json.dumps(schema))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise TypeError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise TypeError("structured_outputs.choice must be a non-empty list of strings")
        if not isinstance(self.json_object, bool):
            raise TypeError(
                f"structured_outputs.json_object must be a bool, got {self.json_object!r}"
            )
        kinds = [k for k in ("json", "regex", "grammar", "choice") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, json_object, regex, grammar, "
                f"choice; got {', '.join(kinds) or 'none'}"
            )

    @property
    def kind(self) -> str:
        """``json``, ``json_object``, ``regex``, ``grammar`` or ``choice``."""
        if self.json_object:
            return "json_object"
        return next(
            k for k in ("json", "regex", "grammar", "choice") if getattr(self, k) is not None
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, for the wire (``StructuredOutputsParams(**d)`` rebuilds it)."""
        return {self.kind: list(self.choice) if self.choice else getattr(self, self.kind)}


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    ``temperature == 0`` (or below 1e-5) is greedy. ``top_k`` of 0 or -1 and ``top_p == 1``
    disable those filters. ``max_tokens=None`` generates until the context is full.
    ``logprobs=k`` returns the sampled token's log-probability and the ``k`` most likely
    alternatives at each step, taken from the model's raw distribution (before temperature
    and filters), as OpenAI does.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Accept a single stop string and lists, as the OpenAI API does, but store tuples so the
        # object stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.structured_outputs, dict):
            known = StructuredOutputsParams.__dataclass_fields__
            unknown = [k for k in self.structured_outputs if k not in known]
            if unknown:
                raise TypeError(
                    f"structured_outputs has unknown fields {unknown!r}; it takes json, "
                    "json_object, regex, grammar or choice"
                )
            so = StructuredOutputsParams(**self.structured_outputs)
            object.__setattr__(self, "structured_outputs", so)
        if self.stop_token_ids is None:
            object.__setattr__(self, "stop_token_ids", ())
        elif isinstance(self.stop_token_ids, (list, tuple)):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        _int("n", self.n, lo=1)
        _num("temperature", self.temperature, lo=0.0)
        _num("top_p", self.top_p, lo=0.0, hi=1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p must be in (0, 1], got 0")
        _int("top_k", self.top_k, lo=-1)
        _num("min_p", self.min_p, lo=0.0, hi=1.0)
        for name in _FIELDS_INT_OR_NONE:
            value = getattr(self, name)
            if value is not None:
                lo = {"max_tokens": 1, "logprobs": 0}.get(name)  # any 64-bit seed is fine
                _int(name, value, lo=lo)
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        _int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}"
            )
        _num("repetition_penalty", self.repetition_penalty, lo=0.0)
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be > 0, got 0")
        _num("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _num("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise TypeError(f"structured_outputs must be StructuredOutputsParams, got {so!r}")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def uses_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    def replace(self, **changes: Any) -> SamplingParams:
        """A validated copy with some fields changed."""
        return replace(self, **changes)


def _int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")


def _num(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond float range; the sampler stores floats
        finite = False
    if not finite:
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
