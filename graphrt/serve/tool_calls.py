"""Tool calls: the JSON schemas that force one (``tool_choice`` "required" or a named function),
and the parsers that find calls in a model's free output (``tool_choice`` "auto").

Parsers, one per model family's format:

- ``llama3_json`` (Llama 3.1/3.2): the whole output is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several calls separated by ``;``.
- ``hermes`` (Qwen2.5, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks, possibly several, possibly after ordinary text.

A parser either finds calls in all of its candidate text or returns the text untouched as
content: a half-parsed answer would lose what the model said.

Which parser a server uses (:func:`detect_parser`): ``--tool-call-parser`` when given; else the
chat template's own markers (``<tool_call>``: hermes; ``<|python_tag|>`` or an ``ipython``
role: llama3_json); else the model type (qwen*: hermes; llama: llama3_json); else both, hermes
first (its marker cannot be mistaken for prose).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

PARSERS = ("llama3_json", "hermes")

_HERMES_OPEN = "<tool_call>"
_HERMES_CLOSE = "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """One function call: ``arguments`` is JSON text, as OpenAI returns it."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedOutput:
    """What a parser made of an output: its calls, and the text that was not a call (``None``
    when there is none). Without calls, ``content`` is the output verbatim."""

    content: str | None
    calls: tuple[ToolCall, ...] = ()


class ToolCallParser(Protocol):
    """Finds a model family's tool calls in its output text."""

    name: str

    def parse(self, text: str) -> ParsedOutput:
        """The calls in a complete output, or the whole text as content."""
        ...

    def hold_from(self, text: str) -> int:
        """Streaming: the offset in the output so far from which text may still turn out to be
        a tool call, so must not be sent as content yet (``len(text)``: none). Never moves
        back as ``text`` grows, so what was sent stays sent."""
        ...


class HermesParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, anywhere in the output.
    An unclosed last block counts (the model may stop at its end-of-turn token instead)."""

    name = "hermes"

    def parse(self, text: str) -> ParsedOutput:
        start = text.find(_HERMES_OPEN)
        if start < 0:
            return ParsedOutput(text)
        outside = [text[:start]]
        calls = []
        pos = start
        while pos >= 0:
            body_start = pos + len(_HERMES_OPEN)
            end = text.find(_HERMES_CLOSE, body_start)
            body = text[body_start:] if end < 0 else text[body_start:end]
            call = _call_from_json(body.strip(), ("arguments", "parameters"))
            if call is None:
                return ParsedOutput(text)
            calls.append(call)
            if end < 0:
                break
            after = end + len(_HERMES_CLOSE)
            pos = text.find(_HERMES_OPEN, after)
            outside.append(text[after:] if pos < 0 else text[after:pos])
        content = "".join(outside).strip()
        return ParsedOutput(content or None, tuple(calls))

    def hold_from(self, text: str) -> int:
        i = text.find(_HERMES_OPEN)
        if i >= 0:
            return i
        return len(text) - _partial_suffix(text, _HERMES_OPEN)


class Llama3JsonParser:
    """The whole output is one or more JSON calls ``{"name", "parameters"}`` separated by
    ``;``, optionally after ``<|python_tag|>`` (kept in the text when special tokens are)."""

    name = "llama3_json"

    def parse(self, text: str) -> ParsedOutput:
        s = text.strip()
        if s.startswith(_PYTHON_TAG):
            s = s[len(_PYTHON_TAG) :].lstrip()
        if not s.startswith("{"):
            return ParsedOutput(text)
        decoder = json.JSONDecoder()
        calls = []
        pos = 0
        while True:
            try:
                obj, pos = decoder.raw_decode(s, pos)
            except ValueError:
                return ParsedOutput(text)
            call = _call_from_obj(obj, ("parameters", "arguments"))
            if call is None:
                return ParsedOutput(text)
            calls.append(call)
            pos = _skip_space(s, pos)
            if pos == len(s):
                return ParsedOutput(None, tuple(calls))
            if s[pos] != ";":
                return ParsedOutput(text)
            pos = _skip_space(s, pos + 1)
            if pos == len(s):  # a trailing separator
                return ParsedOutput(None, tuple(calls))

    def hold_from(self, text: str) -> int:
        s = text.lstrip()
        if not s or s.startswith(("{", _PYTHON_TAG)) or _PYTHON_TAG.startswith(s):
            return 0
        return len(text)


class AnyParser:
    """Hermes blocks when the output has them, else Llama 3 JSON: for models whose format is
    unknown."""

    name = "hermes,llama3_json"

    def __init__(self) -> None:
        self._hermes = HermesParser()
        self._llama = Llama3JsonParser()

    def parse(self, text: str) -> ParsedOutput:
        out = self._hermes.parse(text)
        return out if out.calls else self._llama.parse(text)

    def hold_from(self, text: str) -> int:
        return min(self._hermes.hold_from(text), self._llama.hold_from(text))


def make_parser(name: str | None) -> ToolCallParser:
    """The parser called ``name`` (one of :data:`PARSERS`); ``None``: :class:`AnyParser`."""
    if name is None:
        return AnyParser()
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    raise ValueError(f"tool_call_parser must be one of {list(PARSERS)}, got {name!r}")


def detect_parser(chat_template: str | None, model_type: str | None) -> str | None:
    """The parser for a model whose server was given no ``--tool-call-parser``: from the markers
    its chat template teaches, else from its model type; ``None`` when neither tells."""
    template = chat_template or ""
    if _HERMES_OPEN in template:
        return "hermes"
    if _PYTHON_TAG in template or "ipython" in template:
        return "llama3_json"
    kind = (model_type or "").lower()
    if kind.startswith("qwen"):
        return "hermes"
    if kind == "llama":
        return "llama3_json"
    return None


# ---- forced calls -------------------------------------------------------------------------------
def function_parameters(function: dict[str, Any]) -> dict[str, Any]:
    """A function's parameter schema; a function without one takes an empty object."""
    params = function.get("parameters")
    return params if params is not None else dict(_EMPTY_PARAMETERS)


def required_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The schema of ``tool_choice="required"``: a non-empty array of calls
    ``{"name": <a tool's name>, "parameters": <that tool's arguments>}`` (one call at most
    unless ``parallel``), as vLLM builds it."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [f["name"]]},
                "parameters": function_parameters(f),
            },
            "required": ["name", "parameters"],
        }
        for f in functions
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_required(text: str) -> ParsedOutput:
    """The calls in an output constrained by :func:`required_schema`. Text that is not such an
    array (the output was cut short by ``max_tokens``) stays content."""
    try:
        items = json.loads(text)
    except ValueError:
        return ParsedOutput(text)
    if not isinstance(items, list) or not items:
        return ParsedOutput(text)
    calls = []
    for item in items:
        call = _call_from_obj(item, ("parameters",))
        if call is None:
            return ParsedOutput(text)
        calls.append(call)
    return ParsedOutput(None, tuple(calls))


# ---- helpers ------------------------------------------------------------------------------------
def _call_from_json(text: str, arg_keys: tuple[str, ...]) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return _call_from_obj(obj, arg_keys)


def _call_from_obj(obj: Any, arg_keys: tuple[str, ...]) -> ToolCall | None:
    """A call from ``{"name": str, <one of arg_keys>: object}`` (arguments may be missing: a
    function without parameters), else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in arg_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models send the arguments as JSON text already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _skip_space(s: str, pos: int) -> int:
    while pos < len(s) and s[pos].isspace():
        pos += 1
    return pos


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
