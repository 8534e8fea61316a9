"""Structured outputs and tool calls through the OpenAI API (issue #20).

Most tests run the real app in process (``build_app``, its middleware and error handlers) with
the official ``openai`` client over an ASGI transport, in front of a fake engine client that
records the sampling parameters it is sent and answers with a scripted output text. They check
what the server owns: validation (400s naming ``param``), the mapping to
``structured_outputs``, tools in the chat template, and tool calls read back from an output,
streamed or not.

The last tests run a real server on the default model and need the engine's grammar
enforcement (``graphrt.structured_outputs``); they skip when it is not there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from graphrt.config import EngineConfig
from graphrt.sampling_params import SamplingParams
from graphrt.serve.app import build_app
from graphrt.serve.config import ServerConfig
from graphrt.serve.engine_client import EngineInfo, EngineRejected, OutputBox
from graphrt.serve.ipc import ChoiceDelta, OutputDelta, RejectKind
from graphrt.serve.openai_api import OpenAIServing
from graphrt.serve.tokenization import TokenizerService
from graphrt.serve.tool_calls import required_schema

MODEL = "fake-model"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time"}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


class FakeTokenizer:
    """Records what the chat template was given; every prompt is three tokens."""

    def __init__(self, chat_template: str = "{{ messages }}") -> None:
        self.hf = type("HF", (), {"chat_template": chat_template})()
        self.template_calls: list[tuple[list[dict], dict[str, Any]]] = []

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw) -> list[int]:
        self.template_calls.append((messages, kw))
        return [1, 2, 3]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 100 for c in text] or [0]

    def token_strings(self, ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]


class FakeEngineClient:
    """Stands in for ``EngineClient``: checks the parameters as the real one does, records them,
    and delivers ``pieces`` of text to every choice, one step each, then finishes with
    ``finish_reason``. ``reject``: the engine refuses the request with this message."""

    def __init__(self) -> None:
        self.pieces: list[str] = ["hello"]
        self.finish_reason = "stop"
        self.reject: str | None = None
        self.params: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task] = set()

    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        queue: OutputBox,
        tag: int = 0,
        cache_salt: str | None = None,
    ) -> asyncio.Future[None]:
        SamplingParams(**params)
        self.params.append(params)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self.reject is not None:
            fut.set_exception(EngineRejected(RejectKind.INVALID, self.reject))
            return fut
        fut.set_result(None)
        task = loop.create_task(self._feed(request_id, params["n"], queue, tag))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    async def _feed(self, rid: str, n: int, queue: OutputBox, tag: int) -> None:
        pieces = self.pieces or [""]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            reason = self.finish_reason if last else None
            choices = [ChoiceDelta(i, piece, [k], None, reason, None) for i in range(n)]
            queue.put_nowait((tag, OutputDelta(rid, last, None, choices)))
            # One step per batch, as a slow engine delivers them: wait until the handler has
            # taken this one and waits for the next (bounded, should it never come back).
            for _ in range(10_000):
                if not queue._items and queue._waiter is not None:
                    break
                await asyncio.sleep(0)

    def abort(self, request_ids: list[str]) -> None:
        pass

    def health_problem(self) -> str | None:
        return None


class Harness:
    """The app, its fake engine and tokenizer, and an async ``openai`` client bound to it."""

    def __init__(self, chat_template: str = "{{ messages }}", **server: Any) -> None:
        config = ServerConfig(served_model_name=MODEL, **server)
        self.app = build_app(config, EngineConfig())
        serving = next(
            r.endpoint.__self__
            for r in self.app.routes
            if isinstance(getattr(getattr(r, "endpoint", None), "__self__", None), OpenAIServing)
        )
        self.engine = FakeEngineClient()
        self.tokenizer = FakeTokenizer(chat_template)
        info = EngineInfo("fake", 4096, 1000, 20, 100, 16, True, 0)
        serving.attach(self.engine, info, TokenizerService(self.tokenizer))

    def run(self, fn: Callable[[openai.AsyncOpenAI, httpx.AsyncClient], Any]) -> Any:
        async def go() -> Any:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                client = openai.AsyncOpenAI(
                    base_url="http://test/v1", api_key="x", http_client=http, max_retries=0
                )
                return await fn(client, http)

        return asyncio.run(go())

    def chat(self, **kw: Any) -> Any:
        async def call(client, http):
            return await client.chat.completions.create(model=MODEL, messages=USER, **kw)

        return self.run(call)

    def chat_stream(self, **kw: Any) -> list[Any]:
        async def call(client, http):
            stream = await client.chat.completions.create(
                model=MODEL, messages=USER, stream=True, **kw
            )
            return [chunk async for chunk in stream]

        return self.run(call)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        async def call(client, http):
            return await http.post(path, json=body)

        return self.run(call)


@pytest.fixture
def h() -> Harness:
    return Harness(tool_call_parser="hermes")


def _error(resp: httpx.Response, param: str | None, words: str = "") -> dict:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    assert words.lower() in err["message"].lower(), err
    return err


def _chat_body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **kw}


# ---- response_format and structured_outputs -------------------------------------------------
def test_response_format_maps_to_structured_outputs(h: Harness) -> None:
    h.engine.pieces = ['{"name": "Ada", ', '"age": 36}']
    out = h.chat(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        }
    )
    assert h.engine.params[-1]["structured_outputs"] == {"json": SCHEMA}
    assert json.loads(out.choices[0].message.content) == {"name": "Ada", "age": 36}
    assert out.choices[0].finish_reason == "stop"

    h.chat(response_format={"type": "json_object"})
    assert h.engine.params[-1]["structured_outputs"] == {"json_object": True}
    h.chat(response_format={"type": "text"})
    assert "structured_outputs" not in h.engine.params[-1]
    h.chat()
    assert "structured_outputs" not in h.engine.params[-1]


def test_completions_take_response_format_and_vllm_structured_outputs(h: Harness) -> None:
    async def call(client, http):
        await client.completions.create(
            model=MODEL, prompt="x", extra_body={"response_format": {"type": "json_object"}}
        )
        await client.completions.create(
            model=MODEL, prompt="x", extra_body={"structured_outputs": {"regex": "[0-9]+"}}
        )
        await client.chat.completions.create(
            model=MODEL, messages=USER, extra_body={"structured_outputs": {"choice": ["a", "b"]}}
        )
        await client.chat.completions.create(
            model=MODEL,
            messages=USER,
            extra_body={"structured_outputs": {"grammar": 'root ::= "yes"', "json_object": False}},
        )

    h.run(call)
    got = [p["structured_outputs"] for p in h.engine.params]
    assert got == [
        {"json_object": True},
        {"regex": "[0-9]+"},
        {"choice": ["a", "b"]},
        {"grammar": 'root ::= "yes"'},
    ]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema.name",
            "missing",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", ""),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"type": "str"}}},
                    },
                }
            },
            "response_format",
            "'str' is not a JSON schema type",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
            "response_format.json_schema.schema",
            "",
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "not both",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not valid JSON"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
        ({"structured_outputs": {"ebnf": "x"}}, "structured_outputs.ebnf", "unknown"),
    ],
)
def test_bad_structured_requests_are_400s_naming_the_param(
    h: Harness, body: dict, param: str, words: str
) -> None:
    _error(h.post("/v1/chat/completions", _chat_body(**body)), param, words)
    assert h.engine.params == []


def test_structured_outputs_size_is_bounded() -> None:
    h = Harness(max_structured_output_bytes=1024)
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(100)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "big", "schema": big}}
    err = _error(h.post("/v1/chat/completions", _chat_body(response_format=fmt)), "response_format")
    assert "max_structured_output_bytes=1024" in err["message"]
    tools = [
        {"type": "function", "function": {"name": f"f{i}", "parameters": big}} for i in range(2)
    ]
    _error(h.post("/v1/chat/completions", _chat_body(tools=tools)), "tools", "max_structured")
    _error(
        h.post("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "x" * 2000}}),
        "structured_outputs",
        "max_structured_output_bytes",
    )


def test_engine_grammar_errors_name_the_request_field(h: Harness) -> None:
    h.engine.reject = "structured_outputs.json is not supported or not valid: bad keyword"
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    err = _error(h.post("/v1/chat/completions", _chat_body(response_format=fmt)), "response_format")
    assert "bad keyword" in err["message"]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    _error(h.post("/v1/chat/completions", _chat_body(tools=[WEATHER], tool_choice=choice)),
           "tools", "bad keyword")  # fmt: skip
    _error(
        h.post("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "("}}),
        "structured_outputs",
        "bad keyword",
    )


# ---- tools: validation and the template -----------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tool_choice": "auto"}, "tool_choice", "requires tools"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            "tool_choice",
            "requires tools",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            "'f', which is not among the tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
        (
            {"tools": [{"type": "code_interpreter", "function": WEATHER["function"]}]},
            "tools.0.type",
            "function",
        ),
        ({"tools": [{"type": "function"}]}, "tools.0.function", "missing"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name",
         ""),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"x": {"type": "float"}}}}}]},
            "tools",
            "'float' is not a JSON schema type",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools.1", "twice"),
        (
            {"tools": [WEATHER], "tool_choice": "required",
             "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot be combined",
        ),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s_naming_the_param(
    h: Harness, body: dict, param: str, words: str
) -> None:
    _error(h.post("/v1/chat/completions", _chat_body(**body)), param, words)
    assert h.engine.params == []


def test_tools_go_to_the_chat_template(h: Harness) -> None:
    h.chat(tools=[WEATHER, TIME])
    _, kw = h.tokenizer.template_calls[-1]
    assert kw["tools"] == [WEATHER, TIME]
    # tool_choice "none" still renders them (vLLM's default), and constrains nothing.
    out = h.chat(tools=[WEATHER], tool_choice="none")
    assert h.tokenizer.template_calls[-1][1]["tools"] == [WEATHER]
    assert "structured_outputs" not in h.engine.params[-1]
    assert out.choices[0].message.content == "hello"
    h.chat(tool_choice="none")  # without tools: allowed, as vLLM does
    assert h.tokenizer.template_calls[-1][1] == {}


def test_tool_call_history_reaches_the_template(h: Harness) -> None:
    history = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]

    async def call(client, http):
        return await client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])

    h.run(call)
    messages, _ = h.tokenizer.template_calls[-1]
    # Templates render arguments with tojson: they get the mapping, not its JSON text.
    assert messages[1]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ]
    assert messages[1]["content"] == ""
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


# ---- tools: forced calls --------------------------------------------------------------------
def test_required_tool_choice_forces_and_parses_calls(h: Harness) -> None:
    h.engine.pieces = ['[{"name": "get_weather", ', '"parameters": {"city": "Paris"}}]']
    out = h.chat(tools=[WEATHER, TIME], tool_choice="required")
    functions = [WEATHER["function"], TIME["function"]]
    assert h.engine.params[-1]["structured_outputs"] == {
        "json": required_schema(functions, parallel=True)
    }
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    h.chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert h.engine.params[-1]["structured_outputs"]["json"]["maxItems"] == 1


def test_named_tool_choice_forces_its_parameters(h: Harness) -> None:
    h.engine.pieces = ['{"city": ', '"Paris"}']
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = h.chat(tools=[WEATHER, TIME], tool_choice=choice)
    assert h.engine.params[-1]["structured_outputs"] == {"json": WEATHER["function"]["parameters"]}
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert out.choices[0].finish_reason == "tool_calls"
    # A function without parameters takes an empty object.
    h.engine.pieces = ["{}"]
    h.chat(
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}
    )
    assert h.engine.params[-1]["structured_outputs"] == {
        "json": {"type": "object", "properties": {}}
    }


def test_a_forced_call_cut_short_keeps_finish_reason_length(h: Harness) -> None:
    h.engine.pieces = ['[{"name": "get_weather", "param']
    h.engine.finish_reason = "length"
    out = h.chat(tools=[WEATHER], tool_choice="required", max_tokens=5)
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content == '[{"name": "get_weather", "param'


# ---- tools: auto ----------------------------------------------------------------------------
HERMES_CALL = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call>"
)


def test_auto_parses_hermes_calls_after_text(h: Harness) -> None:
    h.engine.pieces = [HERMES_CALL]
    out = h.chat(tools=[WEATHER], n=2)
    assert "structured_outputs" not in h.engine.params[-1]
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
    ids = {c.message.tool_calls[0].id for c in out.choices}
    assert len(ids) == 2


def test_auto_without_a_call_is_plain_content(h: Harness) -> None:
    h.engine.pieces = ["It is ", "sunny <tool_call> maybe"]  # malformed: content verbatim
    out = h.chat(tools=[WEATHER])
    assert out.choices[0].message.content == "It is sunny <tool_call> maybe"
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"


def test_auto_keeps_one_call_without_parallel_tool_calls(h: Harness) -> None:
    two = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' * 2
    h.engine.pieces = [two]
    assert len(h.chat(tools=[TIME]).choices[0].message.tool_calls) == 2
    out = h.chat(tools=[TIME], parallel_tool_calls=False)
    assert len(out.choices[0].message.tool_calls) == 1


def test_parser_is_chosen_from_the_chat_template() -> None:
    llama = Harness(chat_template="{%- if message.role == 'ipython' %}...")
    llama.engine.pieces = ['<|python_tag|>{"name": "get_time", "parameters": {}}']
    assert llama.chat(tools=[TIME]).choices[0].message.tool_calls[0].function.name == "get_time"
    hermes = Harness(chat_template="<tool_call>\n{{ tool_call }}\n</tool_call>")
    hermes.engine.pieces = ['{"name": "get_time", "parameters": {}}']  # not hermes format
    assert hermes.chat(tools=[TIME]).choices[0].message.tool_calls is None


# ---- streaming ------------------------------------------------------------------------------
def _assemble(chunks: list[Any]) -> tuple[str, list[dict[str, str]], str | None, str | None]:
    """(content, calls, finish_reason, role) from a chat stream of one choice, checking the
    OpenAI delta format of tool calls on the way."""
    content, calls, finish, role = "", [], None, None
    for chunk in chunks:
        for choice in chunk.choices:
            d = choice.delta
            role = role or d.role
            content += d.content or ""
            for tc in d.tool_calls or []:
                if tc.index == len(calls):  # a new call opens with its id, type and name
                    assert tc.id.startswith("call_") and tc.type == "function"
                    assert tc.function.name and tc.function.arguments == ""
                    calls.append({"id": tc.id, "name": tc.function.name, "arguments": ""})
                else:
                    assert tc.index == len(calls) - 1 and tc.id is None
                    calls[-1]["arguments"] += tc.function.arguments
            if choice.finish_reason is not None:
                assert finish is None
                finish = choice.finish_reason
    return content, calls, finish, role


def test_stream_auto_hermes_sends_text_then_the_call(h: Harness) -> None:
    # The marker arrives split across steps: its first part must not leak as content.
    h.engine.pieces = ["Let me ", "check.\n<tool", '_call>\n{"name": "get_weather", ',
                       '"arguments": {"city": "Paris"}}\n</tool_call>']  # fmt: skip
    content, calls, finish, role = _assemble(h.chat_stream(tools=[WEATHER]))
    assert role == "assistant"
    assert content == "Let me check.\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert finish == "tool_calls"


@pytest.mark.parametrize(
    "pieces",
    [
        ["It is ", "sunny in Paris."],
        ["{", '"not": "a call"}'],  # looked like a call while it streamed
        ["a <", "b and c"],
        ["<tool_call>", "{broken"],
        ["\n", "  "],
    ],
)
def test_stream_auto_delivers_text_that_is_no_call(h: Harness, pieces: list[str]) -> None:
    h.engine.pieces = pieces
    content, calls, finish, _ = _assemble(h.chat_stream(tools=[WEATHER]))
    assert content == "".join(pieces)
    assert calls == [] and finish == "stop"


def test_stream_llama3_json_calls() -> None:
    h = Harness(tool_call_parser="llama3_json")
    h.engine.pieces = ['{"name": "get_weather", ', '"parameters": {"city": "Paris"}}; ',
                       '{"name": "get_time", "parameters": {}}']  # fmt: skip
    content, calls, finish, _ = _assemble(h.chat_stream(tools=[WEATHER, TIME]))
    assert content == ""
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_stream_named_streams_argument_fragments(h: Harness) -> None:
    h.engine.pieces = ['{"city": ', '"Par', 'is"}']
    choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = h.chat_stream(tools=[WEATHER], tool_choice=choice)
    content, calls, finish, role = _assemble(chunks)
    assert role == "assistant" and content == ""
    # The head, then each step's fragment as it came.
    assert sum(bool(c.choices and c.choices[0].delta.tool_calls) for c in chunks) == 4
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_stream_required_and_usage(h: Harness) -> None:
    h.engine.pieces = ['[{"name": "get_time", ', '"parameters": {}}]']
    chunks = h.chat_stream(
        tools=[WEATHER, TIME], tool_choice="required", stream_options={"include_usage": True}
    )
    content, calls, finish, _ = _assemble(chunks)
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", "{}")]
    assert finish == "tool_calls" and content == ""
    assert chunks[-1].usage.completion_tokens == 2


# ---- with the engine's grammars (default model) ---------------------------------------------
@pytest.fixture(scope="module")
def real_client(default_model_dir):
    pytest.importorskip("graphrt.structured_outputs")
    pytest.importorskip("xgrammar")
    from graphrt.serve.launcher import ServerProcess

    proc = ServerProcess(
        ["--max-model-len", "512", "--cpu-kv-cache-gb", "0.05", "--max-num-seqs", "4",
         "--api-server-count", "1"]
    )  # fmt: skip
    try:
        proc.start(timeout=300)
        yield openai.OpenAI(base_url=proc.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    finally:
        proc.stop()
        print(proc.log_tail(2000))


@pytest.mark.default_model
def test_real_json_schema_output_follows_the_schema(real_client: openai.OpenAI) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    out = real_client.chat.completions.create(
        model=real_client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
        max_tokens=60,
        temperature=0,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


@pytest.mark.default_model
def test_real_required_and_named_tool_calls_parse(real_client: openai.OpenAI) -> None:
    model = real_client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = real_client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=80, temperature=0,
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments), dict)
    out = real_client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60, temperature=0,
    )  # fmt: skip
    (call,) = out.choices[0].message.tool_calls
    assert isinstance(json.loads(call.function.arguments)["city"], str)
