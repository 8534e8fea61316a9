"""Server pieces that need no server: config and CLI, the IPC wire format, request schemas, the
merging of stream deltas. Fast; the end-to-end tests are in test_server*.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from graphrt.output_processor import SequenceText
from graphrt.request import CompletionOutput, FinishReason, RequestOutput, TokenLogprob
from graphrt.sampling_params import SamplingParams
from graphrt.serve.cli import parse_args
from graphrt.serve.config import API_KEY_ENV, ServerConfig
from graphrt.serve.ipc import (
    ChoiceDelta,
    OutputDelta,
    decode_tokens,
    delta_of,
    encode_tokens,
    pack,
    unpack,
)
from graphrt.serve.openai_api import _merge
from graphrt.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_error,
    parse,
)


def test_cli_defaults_are_secure_and_take_engine_flags(monkeypatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    server, engine = parse_args(["--max-num-seqs", "8", "--max-n", "2"])
    assert server.host == "127.0.0.1" and server.is_loopback
    assert server.api_key is None
    assert server.max_n == 2
    assert engine.max_num_seqs == 8 and engine.model is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_args([])[0].api_key == "from-env"
    assert parse_args(["--api-key", "flag"])[0].api_key == "flag"


@pytest.mark.parametrize(
    ("field", "value"),
    [("port", 70000), ("max_n", 0), ("max_request_body_bytes", 10), ("engine_mode", "fork")],
)
def test_server_config_validates(field: str, value: object) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        ServerConfig(**{field: value})


def test_cli_rejects_bad_values(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--max-num-seqs", "0"])
    assert "max_num_seqs" in capsys.readouterr().err


def _completion(
    index: int,
    ids: list[int],
    text: str,
    new: int,
    new_text: int,
    lps=None,
    finish=None,
    stop_reason=None,
) -> CompletionOutput:
    """A completion whose last ``new`` ids (``new_text`` chars) are its delta."""
    req = SequenceText(f"c{index}", index, SamplingParams())
    req.output_ids = list(ids)
    req.logprobs = lps
    req.append_text(text)
    req.finish_reason = FinishReason(finish) if finish else None
    req.stop_reason = stop_reason
    return CompletionOutput(req, len(ids) - new, len(text) - new_text)


def test_delta_of_leaves_idle_choices_out() -> None:
    lp = [TokenLogprob(3, -0.1, []), TokenLogprob(5, -0.5, [(5, -0.5), (7, -1.25)])]
    out = RequestOutput(
        request_id="r1",
        prompt=None,
        prompt_token_ids=[1, 2],
        outputs=[
            _completion(0, [3, 5], "ab", 1, 1, lps=lp),
            _completion(1, [9], "x", 0, 0),  # no progress
            _completion(2, [4], "y", 0, 0, finish="stop", stop_reason="</s>"),
        ],
        finished=False,
        num_cached_tokens=32,
    )
    got = delta_of(out)
    assert got.request_id == "r1" and not got.finished and got.error is None
    assert got.num_cached_tokens == 32
    assert [c.index for c in got.choices] == [0, 2]  # the idle choice is left out
    c0, c2 = got.choices
    assert (c0.text, c0.token_ids, c0.logprobs) == ("b", [5], lp[1:])
    assert (c2.finish_reason, c2.stop_reason) == ("stop", "</s>")


def test_step_tokens_round_trip_through_the_wire_format() -> None:
    from graphrt.output_processor import CoreFinish, StepTokens

    step = StepTokens(
        step_id=7,
        seq_ids=["a", "b#0", "b#1"],
        ids=[5, 6, 7],
        logprobs=[-0.5, -1.0, -2.0],
        top_ids=[[5], [6], [7]],
        top_logprobs=[[-0.5], [-1.0], [-2.0]],
        finished={
            "a": CoreFinish(FinishReason.STOP, 2),
            "c": CoreFinish(FinishReason.ERROR, error="x"),
        },
        cached={"a": 16, "b": None},
    )
    got = decode_tokens(unpack(pack(encode_tokens(step))))
    assert got == step
    part = decode_tokens(unpack(pack(encode_tokens(step, [1, 2]))))  # one owner's rows
    assert (part.seq_ids, part.ids, part.logprobs) == (["b#0", "b#1"], [6, 7], [-1.0, -2.0])
    assert part.top_ids == [[6], [7]] and part.finished == step.finished


def test_merge_joins_deltas_per_choice() -> None:
    def delta(tag: int, index: int, text: str, ids: list[int], finish: str | None = None):
        choice = ChoiceDelta(index, text, ids, None, finish, None)
        return tag, OutputDelta("r", finish is not None, None, [choice], 0)

    merged = _merge(
        [delta(0, 0, "a", [1]), delta(1, 0, "x", [7]), delta(0, 0, "b", [2], "length")], 2
    )
    assert list(merged) == [0, 2]
    assert (merged[0].text, merged[0].token_ids, merged[0].finish_reason) == (
        "ab",
        [1, 2],
        "length",
    )
    assert merged[2].text == "x"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b'{"prompt": "a", "max_tokens": "3"}', "max_tokens", "valid integer"),
        (b'{"prompt": "a", "n": 1.0}', "n", "valid integer"),
        (b'{"prompt": "a", "seed": 1e400}', "seed", ""),
        (b'{"prompt": "a", "bogus": 1}', "bogus", "unknown parameter"),
        (b'{"max_tokens": 1}', "prompt", "missing"),
        (b'{"prompt": [1, "a"]}', "prompt", ""),
        (b"[]", None, "JSON object"),
        (b"{", None, "not valid JSON"),
    ],
)
def test_validation_errors_name_the_parameter(body: bytes, param: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(CompletionRequest, body)
    message, got = describe_validation_error(info.value)
    assert got == param
    assert words in message


def test_chat_request_accepts_openai_client_fields() -> None:
    req = parse(
        ChatCompletionRequest,
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}],'
        b' "name": "u"}], "max_completion_tokens": 3, "logprobs": true, "top_logprobs": 2,'
        b' "stream": true, "stream_options": {"include_usage": true}, "user": "x", "seed": 1}',
    )
    assert req.messages[0].content[0].text == "hi"
    assert req.stream_options.include_usage


def test_mock_engine_paces_tokens_and_counts_pages() -> None:
    from graphrt.engine import EngineOverloaded, RequestRejected
    from graphrt.output_processor import OutputProcessor
    from graphrt.serve.mock_engine import MockEngine, MockTokenizer

    eng = MockEngine(0.001, max_model_len=64, max_num_seqs=2, max_waiting_requests=4, page_size=4)
    text = OutputProcessor(MockTokenizer())  # the API side's
    a = SamplingParams(max_tokens=3, n=2, logprobs=1)
    seqs_a = eng.add_core_request("a", [1, 2, 3], a)
    text.register(text.new_group("a", seqs_a, None, [1, 2, 3], a, stream=True))
    b = SamplingParams(max_tokens=5, stop=[" day"])  # its third word
    seqs_b = eng.add_core_request("b", [1], b)  # waits: two seqs already running
    text.register(text.new_group("b", seqs_b, None, [1], b, stream=True))
    with pytest.raises(RequestRejected, match="context length"):
        eng.add_core_request("c", [1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(EngineOverloaded):
        eng.add_core_request("d", [1], SamplingParams(n=4))
    wire = []
    for _ in range(3):
        outs, ended = text.process(decode_tokens(unpack(pack(encode_tokens(eng.core_step())))))
        assert [o.request_id for o in outs] == ["a"] and not ended
        wire.append(delta_of(outs[0]))
    assert [len(c.token_ids) for w in wire for c in w.choices] == [1] * 6
    assert all(c.text.strip() for w in wire for c in w.choices)  # the mock's words
    assert wire[-1].finished and wire[-1].choices[0].finish_reason == "length"
    assert wire[0].choices[0].logprobs[0].token_id == wire[0].choices[0].token_ids[0]
    assert eng.pages.num_free == eng.pages.num_usable  # "a" finished: its pages are back
    assert eng.slots.num_free == eng.slots.num_usable == 2  # and its two slots
    for _ in range(5):  # "b", admitted once "a" left, until its stop string
        outs, ended = text.process(eng.core_step())
        assert [o.request_id for o in outs] == ["b"]
        if ended:
            assert eng.end_sequence(ended[0].request_id, FinishReason.STOP)
            break
    assert outs[0].finished and outs[0].outputs[0].stop_reason == " day"
    assert outs[0].outputs[0].text == " world to"
    assert not eng.has_unfinished() and eng.pages.num_free == eng.pages.num_usable
    eng.add_core_request("e", [1], SamplingParams(max_tokens=5))
    eng.core_step()
    assert eng.pages.num_free < eng.pages.num_usable and eng.slots.num_free == 1
    assert eng.abort("e") and not eng.has_unfinished()
    assert eng.pages.num_free == eng.pages.num_usable and eng.kv_usage() == 0.0
    assert eng.slots.num_free == 2


def test_api_server_count_default_and_validation() -> None:
    from graphrt.serve.config import default_api_server_count

    assert [default_api_server_count(c) for c in (1, 2, 7, 8, 12, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]
    assert ServerConfig(api_server_count=3).num_api_servers == 3
    assert ServerConfig().num_api_servers >= 1
    with pytest.raises(ValueError, match="engine_mode"):
        ServerConfig(api_server_count=2, engine_mode="thread")
    with pytest.raises(ValueError, match="api_server_count"):
        ServerConfig(api_server_count=0)
    server, _ = parse_args(["--api-server-count", "2", "--max-concurrent-requests", "5"])
    assert server.api_server_count == 2


def test_output_box_hands_over_batches() -> None:
    import asyncio

    from graphrt.serve.engine_client import OutputBox

    async def run() -> list[list]:
        box = OutputBox()
        got = []

        async def reader() -> None:
            while len(got) < 2:
                got.append(await box.get_all())

        task = asyncio.create_task(reader())
        await asyncio.sleep(0)
        box.put_nowait((0, "a"))
        await asyncio.sleep(0)
        box.put_nowait((0, "b"))
        box.put_nowait((1, "c"))
        await task
        return got

    assert asyncio.run(run()) == [[(0, "a")], [(0, "b"), (1, "c")]]


def test_buffered_metrics_match_direct_observations() -> None:
    from graphrt.serve.metrics import ServerMetrics

    m = ServerMetrics("m")
    for v in (0.0005, 0.001, 0.002, 0.0018, 7.0):
        m.itl.observe(v)
    m.generation_tokens.inc(3)
    m.generation_tokens.inc(2)
    text = m.render()[0].decode()  # render flushes first
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("graphrt_"))
    itl = "graphrt_inter_token_latency_seconds"
    assert float(lines[f'{itl}_bucket{{le="0.001",model_name="m"}}']) == 2  # le is inclusive
    assert float(lines[f'{itl}_bucket{{le="0.0025",model_name="m"}}']) == 4
    assert float(lines[f'{itl}_bucket{{le="5.0",model_name="m"}}']) == 4
    assert float(lines[f'{itl}_bucket{{le="+Inf",model_name="m"}}']) == 5
    assert float(lines[f'{itl}_count{{model_name="m"}}']) == 5
    assert float(lines[f'{itl}_sum{{model_name="m"}}']) == pytest.approx(7.0053)
    assert float(lines['graphrt_generation_tokens_total{model_name="m"}']) == 5
    m.flush()  # nothing buffered: no change
    assert m.render()[0].decode().count(f'{itl}_count{{model_name="m"}} 5.0') == 1


def test_engine_gauges_are_left_out_unless_the_engine_is_healthy() -> None:
    from server_helpers import ENGINE_STATE_GAUGES

    from graphrt.serve.metrics import ServerMetrics

    def samples(m: ServerMetrics) -> dict[str, float]:
        text = m.render()[0].decode()
        lines = [line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("graphrt_")]
        return {k.split("{", 1)[0]: float(v) for k, v in lines}

    m = ServerMetrics("m")
    assert samples(m)["graphrt_engine_healthy"] == 0  # starting: no stats yet
    assert not set(samples(m)) & set(ENGINE_STATE_GAUGES)
    stats = {
        "running": 2, "waiting": 1, "kv_usage": 0.25, "free_pages": 30, "usable_pages": 40,
        "free_slots": 6, "usable_slots": 8, "preemptions": 3, "steps": 9, "failed_requests": 0,
    }  # fmt: skip
    m.update_engine(stats, healthy=True)
    s = samples(m)
    assert s["graphrt_engine_healthy"] == 1 and set(ENGINE_STATE_GAUGES) <= set(s)
    assert (s["graphrt_num_requests_running"], s["graphrt_kv_cache_usage_perc"]) == (2, 0.25)
    assert (s["graphrt_free_slots"], s["graphrt_usable_slots"]) == (6, 8)
    assert (s["graphrt_kv_cache_free_pages"], s["graphrt_kv_cache_usable_pages"]) == (30, 40)

    m.update_engine(stats, healthy=False)  # dead or stuck: its last stats are not reported
    s = samples(m)
    assert s["graphrt_engine_healthy"] == 0 and not set(s) & set(ENGINE_STATE_GAUGES)
    text = m.render()[0].decode()
    assert "# TYPE graphrt_free_slots gauge" in text  # still described
    m.update_engine(stats, healthy=True)  # it recovered (a stuck engine resumed)
    assert set(ENGINE_STATE_GAUGES) <= set(samples(m))


def test_engine_core_routes_each_api_process_its_own_rows() -> None:
    """With two API processes, each step's ids go to the process that added each request:
    rows, core-side finishes and nothing else; an END from the text side ends the completion
    in the engine, and finished, ended and aborted requests leave no route behind."""
    import zmq

    from graphrt.output_processor import completion_ids
    from graphrt.serve.engine_core import EngineCore
    from graphrt.serve.ipc import Msg
    from graphrt.serve.mock_engine import MockEngine

    class Inbox:
        def __init__(self) -> None:
            self.msgs: list[bytes] = []

        def recv(self, flags: int = 0) -> bytes:
            if not self.msgs:
                raise zmq.Again()
            return self.msgs.pop(0)

    class Outbox:
        def __init__(self) -> None:
            self.sent: list[list] = []

        def send(self, data: bytes) -> None:
            self.sent.append(unpack(data))

        def tokens(self) -> list:
            got = [m for m in self.sent if m[0] == Msg.TOKENS]
            self.sent.clear()
            return [decode_tokens(m) for m in got]

    inboxes, outboxes = [Inbox(), Inbox()], [Outbox(), Outbox()]
    eng = MockEngine(1e-4, max_model_len=64)
    core = EngineCore(eng, inboxes, outboxes, heartbeat_s=60.0, parent_pid=None)  # type: ignore[arg-type]

    def send(client: int, msg: list) -> None:
        inboxes[client].msgs.append(pack(msg))
        core._drain_inbox(client)

    send(0, [Msg.ADD, "a", [1, 2], {"max_tokens": 3, "n": 2}, None])
    send(1, [Msg.ADD, "b", [3], {"max_tokens": 8}, None])
    assert outboxes[0].sent[-1] == [Msg.ACKS, [["a", None]]]
    assert outboxes[1].sent[-1] == [Msg.ACKS, [["b", None]]]
    outboxes[0].sent.clear()
    outboxes[1].sent.clear()
    core._step()
    (t0,), (t1,) = outboxes[0].tokens(), outboxes[1].tokens()
    assert t0.seq_ids == completion_ids("a", 2) and t1.seq_ids == ["b"]
    send(1, [Msg.END, [["b", "stop", None]]])  # the text side found a stop string
    assert "b" not in core._requests and not eng.end_sequence("b", FinishReason.STOP)
    for _ in range(2):
        core._step()
    steps = outboxes[0].tokens()
    assert outboxes[1].tokens() == []  # "b" ended: nothing more for process 1
    assert set(steps[-1].finished) == set(completion_ids("a", 2))
    assert all(f.reason is FinishReason.LENGTH for f in steps[-1].finished.values())
    send(0, [Msg.ADD, "c", [4], {"max_tokens": 8}, None])
    send(0, [Msg.ABORT, ["c"]])
    assert core._requests == {} and core._seq_owner == {}
    assert not eng.has_unfinished() and eng.pages.num_free == eng.pages.num_usable
