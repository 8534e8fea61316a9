"""Server lifecycle: SIGTERM drains in-flight requests then exits; a stuck engine process fails
/health; a dead one fails /health and ends in-flight requests with an error instead of hanging.

Each scenario ends its server, so each gets its own; both start in parallel, on a tiny random
model with no tokenizer (token-id prompts; the text of every output is empty).
"""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest
from server_helpers import (
    ENGINE_STATE_GAUGES,
    engine_core_pid,
    engine_idle_and_kv_full,
    load_test_module,
    metrics,
    pid_alive,
    wait_until,
)

from graphrt.serve.launcher import ServerProcess

LONG = 4000  # tokens; far more than any test waits for, so nothing finishes by accident
PROMPT = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def servers(tiny_model_factory) -> dict[str, ServerProcess]:
    model = tiny_model_factory("LlamaForCausalLM", max_position_embeddings=LONG + 96)
    common = ["--model", str(model), "--cpu-kv-cache-gb", "0.01", "--max-num-seqs", "8"]
    common += ["--api-server-count", "1"]  # test_server_multi.py covers several
    procs = {
        "drain": ServerProcess([*common, "--drain-timeout", "120"]),
        "doomed": ServerProcess([*common, "--engine-heartbeat-timeout", "2"]),
    }
    try:
        for p in procs.values():
            p.start(wait=False)
        for p in procs.values():
            p.wait_healthy(300)
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def _data_lines(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def test_sigterm_drains_in_flight_requests_then_exits(servers) -> None:
    server = servers["drain"]
    engine_pid = engine_core_pid(server.proc.pid)
    body = {
        "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        server.proc.send_signal(signal.SIGTERM)
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    usage = json.loads(rest[-2])["usage"]
    assert usage["completion_tokens"] == 300  # the request ran to its end after SIGTERM
    code = server.proc.wait(120)
    assert code in (0, -signal.SIGTERM), server.log_tail()
    wait_until("the engine process has exited", lambda: not pid_alive(engine_pid))
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url + "/health", timeout=5)


def test_stuck_engine_fails_health(servers) -> None:
    server = servers["doomed"]
    engine_pid = engine_core_pid(server.proc.pid)
    # The API process has the engine's stats (a scrape fetches them), as it will while stuck.
    assert engine_idle_and_kv_full(server.base_url)
    os.kill(engine_pid, signal.SIGSTOP)
    try:
        wait_until(
            "/health reports the engine stuck",
            lambda: httpx.get(server.base_url + "/health", timeout=10).status_code == 503,
        )
        err = httpx.get(server.base_url + "/health", timeout=10).json()["error"]
        assert "has not reported" in err["message"]
        m = metrics(server.base_url)  # a stuck engine's last stats are not reported as current
        assert m["graphrt_engine_healthy"] == 0 and not set(m) & set(ENGINE_STATE_GAUGES)
    finally:
        os.kill(engine_pid, signal.SIGCONT)
    wait_until(
        "/health recovers",
        lambda: httpx.get(server.base_url + "/health", timeout=10).status_code == 200,
    )
    wait_until("the engine gauges are back", lambda: engine_idle_and_kv_full(server.base_url))


def test_dead_engine_fails_in_flight_requests_and_health(servers) -> None:
    server = servers["doomed"]
    url = server.base_url
    engine_pid = engine_core_pid(server.proc.pid)
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}
    result: dict[str, httpx.Response] = {}

    def non_streaming() -> None:
        result["resp"] = httpx.post(url + "/v1/completions", json=body, timeout=120)

    worker = threading.Thread(target=non_streaming)
    worker.start()
    wait_until("the first request is in flight",
               lambda: metrics(url)["graphrt_api_requests_in_flight"] == 1)  # fmt: skip
    wait_until("it holds a slot", lambda: metrics(url)["graphrt_free_slots"] == 8 - 1)
    stream_body = {**body, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=stream_body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.kill(engine_pid, signal.SIGKILL)
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    # The stream ends with an error event, not a hang and not a silent truncation.
    assert rest[-1] == "[DONE]"
    assert "engine" in json.loads(rest[-2])["error"]["message"]
    worker.join(120)
    resp = result["resp"]
    assert resp.status_code == 500
    assert "engine" in resp.json()["error"]["message"]

    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 503
    assert "exited" in health.json()["error"]["message"]
    assert health.json()["error"]["code"] == "engine_unavailable"
    again = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert again.status_code == 503
    # Told apart from an overload (code "server_overloaded") by its code, not by its text.
    assert again.json()["error"]["code"] == "engine_unavailable"
    m = metrics(url)
    assert m["graphrt_engine_healthy"] == 0
    assert m["graphrt_request_failure_total:engine_error"] >= 3
    # The dead engine's last stats (running, KV in use, slots held) are not reported, and not
    # as 0 either: no gauge of the engine's state is exported.
    assert not set(m) & set(ENGINE_STATE_GAUGES), sorted(set(m) & set(ENGINE_STATE_GAUGES))
    # So benchmarks/load_test.py's end-of-run checks fail against it instead of passing.
    lt = load_test_module()
    with httpx.Client(base_url=url, timeout=30) as http:
        drained = lt.wait_drained(http, timeout=1.0)
    assert drained[0] is False and drained[2]["engine_healthy"] == 0
    checks = lt.state_checks(drained)
    assert set(checks) == {"drained", "kv_released", "slots_released"}
    assert not any(c["ok"] for c in checks.values()), checks
    assert server.proc.poll() is None  # the API process stays up to report the failure
    assert server.stop() in (0, -signal.SIGTERM)
