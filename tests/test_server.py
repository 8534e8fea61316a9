"""The OpenAI-compatible server, end to end: one real server process (default model, CPU) for the
whole module, driven by the official ``openai`` client and by raw HTTP for malformed input.

The module's last test checks that after everything above (bad input, disconnects, property-based
garbage) a request still succeeds and the KV allocator is back to full.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import openai
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server_helpers import (
    ENGINE_STATE_GAUGES,
    engine_core_pid,
    engine_idle_and_kv_full,
    maps_torch,
    metrics,
    wait_until,
)

from graphrt.serve.launcher import ServerProcess

pytestmark = pytest.mark.default_model

KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 256
SERVER_ARGS = [
    "--api-key", KEY,
    "--max-model-len", str(MAX_MODEL_LEN),
    "--cpu-kv-cache-gb", "0.05",
    "--max-num-seqs", "16",
    "--max-n", "4",
    "--max-stop-strings", "4",
    "--max-stop-string-length", "20",
    "--max-stop-token-ids", "8",
    "--max-prompt-tokens", "200",
    "--max-output-tokens", "240",
    "--max-request-body-bytes", "65536",
    "--max-concurrent-requests", "4",
    "--engine-heartbeat-timeout", "60",
    # One API process whatever the machine's CPUs (the limit tests count on it);
    # test_server_multi.py covers several.
    "--api-server-count", "1",
]  # fmt: skip
PROMPT = "Hello, my name is"


@pytest.fixture(scope="module")
def server(default_model_dir) -> ServerProcess:
    proc = ServerProcess(SERVER_ARGS)
    try:
        proc.start(timeout=300)
        yield proc
    finally:
        code = proc.stop()
        print(proc.log_tail(2000))
        assert code is not None


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    ) as c:
        yield c


def _error(resp: httpx.Response, status: int, param: str | None = "*") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param != "*":
        assert err["param"] == param, err
    return err


# ---- happy paths ----------------------------------------------------------------------------
def test_health_models_and_tokenize(server: ServerProcess, http: httpx.Client, client) -> None:
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    tok = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    assert tok["max_model_len"] == MAX_MODEL_LEN
    back = http.post("/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back["prompt"].endswith(PROMPT)
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2
    # The API process tokenized and applied the chat template without loading torch; the
    # engine process runs the model with it.
    assert not maps_torch(server.proc.pid)
    assert maps_torch(engine_core_pid(server.proc.pid))


def test_completion_greedy_and_stop_strings(client: openai.OpenAI) -> None:
    ref = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    choice = ref.choices[0]
    assert choice.finish_reason == "length"
    assert ref.usage.completion_tokens == 8
    assert ref.usage.prompt_tokens > 0
    text = choice.text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = text.index(stop)

    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop, "\u2603"]
    )
    assert out.choices[0].text == text[:cut]
    assert out.choices[0].finish_reason == "stop"
    assert out.model_extra is not None
    assert out.choices[0].model_extra["stop_reason"] == stop

    kept = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=stop,
        extra_body={"include_stop_str_in_output": True},
    )  # fmt: skip
    assert kept.choices[0].text == text[: cut + len(stop)]

    # The same greedy request streamed gives the same text.
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_and_streaming_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    full = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.usage.completion_tokens == 6

    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.completion_tokens == 6
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + 6
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == msg.content
    assert content[-1].choices[0].finish_reason == "length"


def test_prefix_cache_usage_salt_and_metrics(server: ServerProcess, client, http) -> None:
    # A long system prompt, as applications send: its full pages are cached after the first
    # request, reported as usage.prompt_tokens_details.cached_tokens, streamed or not.
    system = "You are a careful assistant. " * 12
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a color."}]
    before = metrics(server.base_url)
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0,
        extra_body={"cache_salt": "cache-test"},
    )  # fmt: skip
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = (first.usage.prompt_tokens - 1) // 16 * 16  # whole pages before the last token
    assert cached >= 64
    again = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0,
        extra_body={"cache_salt": "cache-test"},
    )  # fmt: skip
    assert again.usage.prompt_tokens_details.cached_tokens == cached
    assert again.choices[0].message.content == first.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"cache_salt": "cache-test"},
    )  # fmt: skip
    usages = [c.usage for c in stream]
    assert all(u.prompt_tokens_details.cached_tokens == cached for u in usages)
    # Another tenant's salt shares nothing.
    other = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0,
        extra_body={"cache_salt": "someone-else"},
    )  # fmt: skip
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    after = metrics(server.base_url)
    queries, hits = "graphrt_prefix_cache_queries_total", "graphrt_prefix_cache_hits_total"
    assert after[queries] - before[queries] == 4 * first.usage.prompt_tokens
    assert after[hits] - before[hits] == 2 * cached
    _error(http.post("/v1/completions", json={"prompt": "a", "cache_salt": ""}), 400, "cache_salt")


def test_n_greater_than_one(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, n=3, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 12
    again = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, n=3, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.text for c in again.choices] == [c.text for c in out.choices]

    # Two prompts x n=2 streamed: four choices, each finished once.
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=[PROMPT, "The sky is"],
            max_tokens=3,
            n=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2, 3]

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=2
    )
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) <= 2
        assert value == pytest.approx(max(top.values()))  # greedy takes the top token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert bytes(item.bytes).decode() == item.token


# ---- bad input --------------------------------------------------------------------------------
LONG_IDS = [100] * (MAX_MODEL_LEN + 10)

COMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSGS = [{"role": "user", "content": "x"}]


def _bad(name: str, path: str, body: dict, param: str | None, status: int = 400):
    return pytest.param(path, body, status, param, id=name)


BAD_REQUESTS = [
    _bad("wrong-type-max-tokens", COMPL, {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    _bad("float-for-int", COMPL, {"prompt": "a", "n": 2.0}, "n"),
    _bad("wrong-type-prompt", COMPL, {"prompt": {"a": 1}}, "prompt"),
    _bad("missing-prompt", COMPL, {"max_tokens": 2}, "prompt"),
    _bad("unknown-parameter", COMPL, {"prompt": "a", "max_tokenz": 2}, "max_tokenz"),
    _bad("temperature-negative", COMPL, {"prompt": "a", "temperature": -1}, "temperature"),
    _bad("top-p-above-one", COMPL, {"prompt": "a", "top_p": 1.5}, "top_p"),
    _bad("n-zero", COMPL, {"prompt": "a", "n": 0}, "n"),
    _bad("max-tokens-zero", COMPL, {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    _bad("presence-penalty", COMPL, {"prompt": "a", "presence_penalty": 3}, "presence_penalty"),
    _bad("min-over-max", COMPL, {"prompt": "a", "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    _bad("logprobs-over-max", COMPL, {"prompt": "a", "logprobs": 50}, "logprobs"),
    _bad("huge-int", COMPL, {"prompt": "a", "seed": 2**70}, "seed"),
    _bad("empty-prompt", COMPL, {"prompt": ""}, "prompt"),
    _bad("empty-token-prompt", COMPL, {"prompt": []}, "prompt"),
    _bad("token-outside-vocab", COMPL, {"prompt": [1, 10**9]}, "prompt"),
    _bad("empty-messages", CHAT, {"messages": []}, "messages"),
    _bad("bad-role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    _bad(
        "image-part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages.0.content.0",
    ),
    _bad("top-logprobs-alone", CHAT, {"messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
    _bad("prompt-beyond-context", COMPL, {"prompt": LONG_IDS}, "prompt"),
    _bad("max-tokens-beyond-context", COMPL, {"prompt": "a", "max_tokens": 256}, "max_tokens"),
    _bad("max-prompt-tokens-limit", COMPL, {"prompt": [100] * 220}, "prompt"),
    _bad("max-output-tokens-limit", CHAT, {"messages": MSGS, "max_tokens": 241}, "max_tokens"),
    _bad("max-n-limit", COMPL, {"prompt": "a", "n": 5}, "n"),
    _bad("max-n-limit-batch", COMPL, {"prompt": ["a", "b", "c"], "n": 2}, "n"),
    _bad("max-stop-strings", COMPL, {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    _bad("max-stop-string-length", COMPL, {"prompt": "a", "stop": "x" * 21}, "stop"),
    _bad(
        "max-stop-token-ids",
        COMPL,
        {"prompt": "a", "stop_token_ids": [*range(9)]},
        "stop_token_ids",
    ),
    _bad("empty-stop-string", COMPL, {"prompt": "a", "stop": [""]}, "stop"),
    _bad("lone-surrogate", COMPL, {"prompt": "\ud800"}, None),
    _bad("unknown-model", COMPL, {"model": "gpt-9", "prompt": "a"}, "model", 404),
    _bad("unknown-model-chat", CHAT, {"model": "gpt-9", "messages": MSGS}, "model", 404),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_request(http: httpx.Client, path: str, body: dict, status: int, param: str) -> None:
    resp = http.post(path, content=json.dumps(body).encode())
    err = _error(resp, status, param)
    if status == 404:
        assert err["code"] == "model_not_found"


def test_limit_errors_name_the_limit(http: httpx.Client) -> None:
    for body, limit in [
        ({"prompt": "a", "n": 5}, "max_n=4"),
        ({"prompt": [100] * 220}, "max_prompt_tokens=200"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "max_stop_strings=4"),
        ({"prompt": "a", "stop": "x" * 21}, "max_stop_string_length=20"),
        ({"prompt": "a", "stop_token_ids": list(range(9))}, "max_stop_token_ids=8"),
        ({"prompt": "a", "max_tokens": 241}, "max_output_tokens=240"),
    ]:
        resp = http.post("/v1/completions", json=body)
        assert limit in _error(resp, 400)["message"]
    resp = http.post("/v1/completions", json={"prompt": LONG_IDS})
    assert _error(resp, 400)["code"] == "context_length_exceeded"


def test_invalid_json_and_non_object_bodies(http: httpx.Client) -> None:
    for raw in [b"{not json", b"", b"[1, 2]", b'"text"', b"null", b"[" * 5000 + b"]" * 5000]:
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            _error(http.post(path, content=raw), 400)


def test_oversized_bodies(http: httpx.Client) -> None:
    big = json.dumps({"prompt": "x" * 70_000}).encode()
    err = _error(http.post("/v1/completions", content=big), 413)
    assert "max_request_body_bytes=65536" in err["message"]

    def chunks():  # no Content-Length: the limit must trip while streaming the body
        for _ in range(20):
            yield b" " * 8192

    _error(http.post("/v1/completions", content=chunks()), 413)


def test_api_key(server: ServerProcess) -> None:
    url = server.base_url
    body = {"prompt": "a", "max_tokens": 1}
    _error(httpx.post(url + "/v1/completions", json=body), 401)
    _error(
        httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer x"}), 401
    )
    _error(httpx.get(url + "/v1/models"), 401)
    _error(httpx.post(url + "/tokenize", json={"prompt": "a"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200


def test_unknown_route_and_method(http: httpx.Client) -> None:
    _error(http.get("/v1/nothing"), 404)
    _error(http.get("/v1/completions"), 405)


# ---- lifecycle of a request ---------------------------------------------------------------
def _disconnects(base_url: str) -> float:
    return metrics(base_url).get("graphrt_request_failure_total:client_disconnect", 0.0)


LONG_BODY = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}


def test_streaming_client_disconnect_aborts(server: ServerProcess, http: httpx.Client) -> None:
    before = _disconnects(server.base_url)
    with http.stream("POST", "/v1/completions", json={**LONG_BODY, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        m = metrics(server.base_url)
        assert m["graphrt_num_requests_running"] == 1
        assert m["graphrt_free_slots"] == m["graphrt_usable_slots"] - 1 == 16 - 1
    # Leaving the block closed the connection mid-stream.
    wait_until("the stream's request is aborted", lambda: _disconnects(server.base_url) > before)
    wait_until("its pages and slot are freed", lambda: engine_idle_and_kv_full(server.base_url))


def test_non_streaming_client_disconnect_aborts(server: ServerProcess) -> None:
    before = _disconnects(server.base_url)
    body = json.dumps(LONG_BODY).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((server.host, server.port))
    try:
        sock.sendall(head + body)
        wait_until(
            "the request runs",
            lambda: metrics(server.base_url)["graphrt_num_requests_running"] == 1,
        )
    finally:
        sock.close()
    wait_until("the request is aborted", lambda: _disconnects(server.base_url) > before)
    wait_until("its pages are freed", lambda: engine_idle_and_kv_full(server.base_url))


def test_stop_string_ends_the_request_in_the_engine(server: ServerProcess, client) -> None:
    """The API process finds stop strings (the engine core deals in ids); a completion it ends
    there is ended in the core too: the engine stops sampling it a few steps later, not at
    max_tokens, and frees its pages."""
    ref = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    stop = ref.choices[0].text.split()[1]
    wait_until("the engine is idle", lambda: engine_idle_and_kv_full(server.base_url))
    before = metrics(server.base_url)["graphrt_engine_steps"]
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens < 6
    wait_until("its pages are freed", lambda: engine_idle_and_kv_full(server.base_url))
    steps = metrics(server.base_url)["graphrt_engine_steps"] - before
    assert steps < 50, steps  # not the 200 that max_tokens allowed


def test_stalled_client_holds_no_kv_pages(server: ServerProcess, http: httpx.Client) -> None:
    """A client that does not read cannot hold engine memory: the engine finishes its request and
    frees the pages; the stream waits (in the API process or the socket) for the client."""
    body = {**LONG_BODY, "max_tokens": 24, "stream": True}
    before = metrics(server.base_url)["graphrt_generation_tokens_total"]
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200

        def engine_done_stream_open() -> bool:
            m = metrics(server.base_url)
            return (
                m["graphrt_num_requests_running"] == 0
                and m["graphrt_generation_tokens_total"] >= before + 24
                and m["graphrt_kv_cache_free_pages"] == m["graphrt_kv_cache_usable_pages"]
            )

        wait_until("the engine finishes the unread request", engine_done_stream_open)
        data = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_max_concurrent_requests(server: ServerProcess, http: httpx.Client) -> None:
    wait_until("no request is in flight", lambda: engine_idle_and_kv_full(server.base_url))
    streams = []
    try:
        for _ in range(4):
            cm = http.stream("POST", "/v1/completions", json={**LONG_BODY, "stream": True})
            resp = cm.__enter__()
            # Keep the line iterator alive: dropping it mid-stream closes the connection.
            lines = resp.iter_lines()
            streams.append((cm, lines))
            assert resp.status_code == 200
            assert next(line for line in lines if line.startswith("data: "))
        assert metrics(server.base_url)["graphrt_api_requests_in_flight"] == 4
        err = _error(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}), 503)
        assert "max_concurrent_requests=4" in err["message"]
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    wait_until("all four are aborted", lambda: engine_idle_and_kv_full(server.base_url))


def test_concurrent_requests_get_their_own_tokens(client: openai.OpenAI) -> None:
    ref = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    results: list[str] = []

    def run() -> None:
        out = client.completions.create(
            model=MODEL, prompt="The sky is", max_tokens=5, temperature=0
        )
        results.append(out.choices[0].text)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Batched together, each greedy request still gets exactly what it gets alone.
    assert results == [ref.choices[0].text] * 3


# ---- property-based: no JSON body crashes the server ----------------------------------------
_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=8),
)  # fmt: skip
_json = st.recursive(
    _json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid seven times in eight, so that a body with several fields still often passes."""
    return st.integers(0, 7).flatmap(lambda k: invalid if k == 0 else valid)


_SAMPLING = {
    "n": _mostly(st.integers(1, 3), st.integers(-2, 0) | st.integers(5, 99)),
    "temperature": _mostly(st.floats(0, 2), st.floats(-5, -0.01) | st.just("1")),
    "top_p": _mostly(st.floats(0.05, 1), st.floats(1.01, 5) | st.just(0)),
    "top_k": _mostly(st.integers(-1, 50), st.integers(-9, -2) | st.just(1.5)),
    "min_p": _mostly(st.floats(0, 1), st.floats(1.01, 5)),
    "seed": _mostly(st.integers(0, 2**63), st.integers(2**64, 2**70) | st.just(-(2**70))),
    "stop": _mostly(
        st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=3),
        st.just([""]) | st.lists(st.integers(), min_size=1, max_size=2),
    ),
    "stop_token_ids": _mostly(
        st.lists(st.integers(0, 49151), max_size=3), st.just([-1]) | st.just([10**12])
    ),
    "presence_penalty": _mostly(st.floats(-2, 2), st.floats(2.01, 9)),
    "frequency_penalty": _mostly(st.floats(-2, 2), st.floats(-9, -2.01)),
    "repetition_penalty": _mostly(st.floats(0.5, 2), st.floats(-1, 0)),
    "min_tokens": _mostly(st.integers(0, 2), st.integers(-3, -1) | st.integers(3, 9)),
    "ignore_eos": _mostly(st.booleans(), st.just("yes")),
    "include_stop_str_in_output": _mostly(st.booleans(), st.just(1)),
    "skip_special_tokens": _mostly(st.booleans(), st.just(None)),
    "stream": _mostly(st.booleans(), st.just("true")),
    "stream_options": _mostly(
        st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({"x": 1})
    ),
    "model": _mostly(st.just(MODEL), st.just("other")),
}
# Generation is kept short whatever else is drawn: max_tokens is always present and small
# (or invalid), so a valid body costs at most a few decode steps.
# (None is not drawn: for chat it means "the rest of the context".)
_MAX_TOKENS = _mostly(st.integers(1, 2), st.sampled_from([0, -1, "2", 2.0, 10**30]))


def _with_junk(bodies: st.SearchStrategy) -> st.SearchStrategy:
    """The bodies as drawn, or with one field (known or not) set to arbitrary JSON."""
    keys = st.sampled_from([*_SAMPLING, "prompt", "messages", "logprobs", "zzz"])
    junked = st.tuples(bodies, keys, _json).map(lambda t: {**t[0], t[1]: t[2]})
    return st.one_of(bodies, junked)


_completion_bodies = _with_junk(
    st.fixed_dictionaries(
        {
            "prompt": _mostly(
                st.text(min_size=1, max_size=20)
                | st.lists(st.integers(0, 49151), min_size=1, max_size=6)
                | st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=2),
                st.just("") | st.just([]) | st.lists(st.integers(-3, -1), min_size=1),
            ),
            "max_tokens": _MAX_TOKENS,
        },
        optional={**_SAMPLING, "logprobs": _mostly(st.integers(0, 5), st.integers(21, 99))},
    )
)
_message = st.fixed_dictionaries(
    {
        "role": _mostly(
            st.sampled_from(["user", "system", "assistant", "developer"]), st.just("wizard")
        ),
        "content": _mostly(
            st.text(max_size=20)
            | st.lists(
                st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                max_size=2,
            ),
            st.just([{"type": "image_url"}]) | st.just(5),
        ),
    }
)
_chat_bodies = _with_junk(
    st.fixed_dictionaries(
        {
            "messages": _mostly(st.lists(_message, min_size=1, max_size=3), st.just([])),
            "max_tokens": _MAX_TOKENS,
        },
        optional={
            **_SAMPLING,
            "logprobs": _mostly(st.booleans(), st.just(3)),
            "top_logprobs": _mostly(st.integers(0, 5), st.integers(21, 99)),
        },
    )
)


def _post_and_check(http: httpx.Client, path: str, body: object) -> None:
    try:
        content = json.dumps(body).encode()
    except ValueError:
        return
    with http.stream("POST", path, content=content) as resp:
        data = resp.read()
    event(f"{path} -> {resp.status_code}")
    assert resp.status_code == 200 or 400 <= resp.status_code < 500, (resp.status_code, data)
    if resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"):
        assert data.rstrip().endswith(b"data: [DONE]"), data[-300:]
        assert b'"error"' not in data, data
    elif resp.status_code == 200:
        assert json.loads(data)["choices"]
    else:
        assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}


_HYPOTHESIS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_HYPOTHESIS
@given(body=_completion_bodies)
def test_property_completions_never_5xx(http: httpx.Client, body: dict) -> None:
    _post_and_check(http, "/v1/completions", body)


@_HYPOTHESIS
@given(body=_chat_bodies)
def test_property_chat_never_5xx(http: httpx.Client, body: dict) -> None:
    _post_and_check(http, "/v1/chat/completions", body)


@settings(_HYPOTHESIS, max_examples=40)
@given(body=_json, path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize",
                                        "/detokenize"]))  # fmt: skip
def test_property_any_json_never_5xx(http: httpx.Client, body: object, path: str) -> None:
    _post_and_check(http, path, body)


# ---- metrics, and the final check -------------------------------------------------------------
def test_metrics_content(server: ServerProcess) -> None:
    m = metrics(server.base_url)
    for name in (
        *ENGINE_STATE_GAUGES,
        "graphrt_time_to_first_token_seconds_count",
        "graphrt_inter_token_latency_seconds_count",
        "graphrt_prompt_tokens_total",
        "graphrt_generation_tokens_total",
        "graphrt_engine_healthy",
    ):
        assert name in m, name
    assert m["graphrt_time_to_first_token_seconds_count"] > 0
    assert m["graphrt_inter_token_latency_seconds_count"] > 0
    assert m["graphrt_generation_tokens_total"] > 0
    assert m["graphrt_engine_healthy"] == 1
    assert m["graphrt_usable_slots"] == 16  # --max-num-seqs
    assert m["graphrt_request_success_total:length"] > 0
    for reason in ("invalid_request", "unauthorized", "not_found", "too_large", "overloaded"):
        assert m[f"graphrt_request_failure_total:{reason}"] > 0, reason


def test_zz_final_request_succeeds_and_kv_is_full(server: ServerProcess, client) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Still there?"}], max_tokens=3
    )
    assert out.choices[0].message.content is not None
    assert out.usage.completion_tokens >= 1
    wait_until("the engine is idle", lambda: engine_idle_and_kv_full(server.base_url))
    assert httpx.get(server.base_url + "/health").status_code == 200
