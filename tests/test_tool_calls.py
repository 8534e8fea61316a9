"""Tool-call parsers (Llama 3 JSON, Hermes) and the schemas that force a call: pure functions,
no server."""

from __future__ import annotations

import json

import pytest

from graphrt.serve.tool_calls import (
    AnyParser,
    HermesParser,
    Llama3JsonParser,
    detect_parser,
    make_parser,
    parse_required,
    required_schema,
)

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {"name": "get_time"}  # no parameters


def _calls(out) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in out.calls]


# ---- Llama 3 JSON ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '  {"name": "get_weather", "parameters": {"city": "Paris"}}\n',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}',
    ],
)
def test_llama3_one_call(text: str) -> None:
    out = Llama3JsonParser().parse(text)
    assert out.content is None
    assert _calls(out) == [("get_weather", {"city": "Paris"})]
    assert out.calls[0].id.startswith("call_")


def test_llama3_several_calls_separated_by_semicolons() -> None:
    text = (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {}};'
    )
    out = Llama3JsonParser().parse(text)
    assert _calls(out) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert out.calls[0].id != out.calls[1].id


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is sunny.",
        '{"name": "get_weather", "parameters": {"city": "Par',  # cut short
        '{"city": "Paris"}',  # JSON, but no call
        '{"name": "get_weather", "parameters": {}} and then some prose',
        '{"name": "get_weather", "parameters": [1, 2]}',
        "",
    ],
)
def test_llama3_non_calls_stay_content_verbatim(text: str) -> None:
    out = Llama3JsonParser().parse(text)
    assert out.calls == ()
    assert out.content == text


def test_llama3_holds_back_only_what_may_be_a_call() -> None:
    p = Llama3JsonParser()
    assert p.hold_from("Sure, ") == len("Sure, ")
    assert p.hold_from("") == 0
    assert p.hold_from("\n ") == 0  # not yet known
    assert p.hold_from(' {"na') == 0
    assert p.hold_from("<|python") == 0
    assert p.hold_from("<|python_tag|>{") == 0
    assert p.hold_from("<p>") == 3


# ---- Hermes ---------------------------------------------------------------------------------
def test_hermes_one_call_with_text_before() -> None:
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    out = HermesParser().parse(text)
    assert out.content == "Let me check."
    assert _calls(out) == [("get_weather", {"city": "Paris"})]


def test_hermes_several_calls_and_an_unclosed_last_one() -> None:
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n'
    )
    out = HermesParser().parse(text)
    assert out.content is None
    assert _calls(out) == [("get_weather", {"city": "Paris"}), ("get_time", {})]


@pytest.mark.parametrize(
    "text",
    [
        "No tools needed: 4.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',
        "<tool_call>\nnot json\n</tool_call>",
        # One good call and one malformed: nothing is half-parsed.
        '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"x": 1}</tool_call>',
    ],
)
def test_hermes_malformed_stays_content_verbatim(text: str) -> None:
    out = HermesParser().parse(text)
    assert out.calls == ()
    assert out.content == text


def test_hermes_holds_back_from_the_marker_and_its_prefixes() -> None:
    p = HermesParser()
    assert p.hold_from("Hello") == 5
    assert p.hold_from("Hello <tool") == 6
    assert p.hold_from("Hello <tool_call>{") == 6
    assert p.hold_from("a < b") == 5
    assert p.hold_from("a <") == 2


def test_hold_from_never_moves_back_as_text_grows() -> None:
    text = 'Okay <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call> done'
    for parser in (HermesParser(), Llama3JsonParser(), AnyParser()):
        last = 0
        for i in range(len(text) + 1):
            h = parser.hold_from(text[:i])
            assert last <= h <= i, (parser.name, i)
            last = h


def test_any_parser_reads_both_formats() -> None:
    p = AnyParser()
    hermes = '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'
    llama = '{"name": "a", "parameters": {"x": 1}}'
    assert _calls(p.parse(hermes)) == _calls(p.parse(llama)) == [("a", {"x": 1})]
    assert p.parse("plain").content == "plain"


# ---- choosing a parser ----------------------------------------------------------------------
def test_detect_parser_from_template_then_model_type() -> None:
    assert detect_parser("... <tool_call>\n{{ tool_call | tojson }} ...", "llama") == "hermes"
    assert detect_parser("{%- if message.role == 'ipython' %}", "qwen2") == "llama3_json"
    assert detect_parser("{{ '<|python_tag|>' }}", None) == "llama3_json"
    assert detect_parser("{{ messages }}", "qwen2") == "hermes"
    assert detect_parser(None, "llama") == "llama3_json"
    assert detect_parser("{{ messages }}", "mistral") is None
    assert isinstance(make_parser(None), AnyParser)
    assert make_parser("hermes").name == "hermes"
    with pytest.raises(ValueError, match="tool_call_parser"):
        make_parser("mistral")


# ---- forced calls ---------------------------------------------------------------------------
def test_required_schema_is_an_array_of_calls_of_the_tools() -> None:
    schema = required_schema([WEATHER, TIME], parallel=True)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert "maxItems" not in schema
    weather, time = schema["items"]["anyOf"]
    assert weather["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert weather["properties"]["parameters"] == WEATHER["parameters"]
    assert weather["required"] == ["name", "parameters"]
    # A function without parameters takes an empty object.
    assert time["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert required_schema([WEATHER], parallel=False)["maxItems"] == 1


def test_required_schema_validates_what_it_means() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = required_schema([WEATHER, TIME], parallel=False)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}}], schema)
    for bad in (
        [],
        [{"name": "get_weather", "parameters": {}}],
        [{"name": "other", "parameters": {}}],
        [{"name": "get_time", "parameters": {}}] * 2,
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_parse_required_output() -> None:
    text = (
        '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
        '{"name": "get_time", "parameters": {}}]'
    )
    out = parse_required(text)
    assert out.content is None
    assert _calls(out) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    cut = '[{"name": "get_weather", "parameters": {"ci'
    assert parse_required(cut).calls == () and parse_required(cut).content == cut
    assert parse_required("[]").calls == ()


def test_server_flags_validate() -> None:
    from graphrt.serve.config import ServerConfig

    assert ServerConfig().tool_call_parser is None
    assert ServerConfig().max_structured_output_bytes == 64 * 1024
    assert ServerConfig(tool_call_parser="llama3_json").tool_call_parser == "llama3_json"
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="mistral")
    with pytest.raises(ValueError, match="max_structured_output_bytes"):
        ServerConfig(max_structured_output_bytes=0)
