"""Request schemas of the OpenAI-compatible API (pydantic, strict).

Strict: a string is not a number and ``1.0`` is not an int, so wrong types are reported rather
than guessed at. Unknown fields are refused with 400, as OpenAI does, so a misspelt parameter
never silently does nothing. Integers are bounded to 64 bits here so everything that validates
can be encoded for the engine; the finer ranges are :class:`~graphrt.SamplingParams`'s job, so
each rule lives in one place.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
UInt64 = Annotated[int, Field(ge=0, le=2**64 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JSONSchemaFormat(_Strict):
    """``response_format.json_schema``. ``schema`` is required here although OpenAI's reference
    marks it optional: without it there is nothing to enforce."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    # Aliased: a field called "schema" would shadow BaseModel.schema.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: ``text``, ``json_object``, or ``json_schema`` with its schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsRequest(_Strict):
    """vLLM's ``structured_outputs`` extra field: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions (OpenAI names, then vLLM extras)."""

    model: str | None = None
    n: Int64 | None = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int64 | UInt64 | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int64 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Int64] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # vLLM's: requests share cached prompt prefixes only with requests of the same salt.
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # OpenAI's on chat; vLLM also takes it on completions.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt`` is a string, token ids, or a list of either."""

    prompt: str | list[Int64] | list[str] | list[list[Int64]]
    max_tokens: Int64 | None = 16
    logprobs: Int64 | None = None
    echo: bool | None = False
    best_of: Int64 | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """A call in an earlier assistant turn, as OpenAI returned it."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # Earlier assistant turns may carry fields we do not use (refusal, audio, ...).
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice`` naming the function the model must call."""

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = False
    top_logprobs: Int64 | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = True
    # Accepted and ignored, as they only matter to OpenAI's own platform.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


class TokenizeRequest(_Strict):
    """``POST /tokenize``: a ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Strict):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[Int64]


ChatRole = Literal["system", "developer", "user", "assistant", "tool"]
CHAT_ROLES: frozenset[str] = frozenset(ChatRole.__args__)


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter's dotted path, from pydantic's error."""
    first = err.errors(include_url=False)[0]
    kind = first.get("type", "")
    loc = [str(p) for p in first.get("loc", ())]
    if kind == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg', '')}", None
    if kind == "model_type" and not loc:
        return "request body must be a JSON object", None
    # Union members add their type names to the path ("prompt.str"); drop them.
    loc = [p for p in loc if not _is_type_tag(p)]
    param = ".".join(loc) or None
    if kind == "extra_forbidden":
        return f"unknown parameter {param!r}", param
    if kind == "missing":
        return f"missing required parameter {param!r}", param
    return f"invalid value for {param!r}: {first.get('msg', kind)}", param


def _is_type_tag(part: str) -> bool:
    # pydantic names union members in the path: "str", "list[int]", "constrained-int", ...
    return part in ("str", "int", "float", "bool", "list", "dict", "none") or any(
        c in part for c in "[-"
    )


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body; raises ``ValidationError``."""
    return model.model_validate_json(body)
