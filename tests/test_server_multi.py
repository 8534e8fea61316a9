"""Two API processes in front of one engine core (``--api-server-count 2``): requests through
both, per-request routing of outputs, abort on disconnect, metrics merged over the processes,
/health when the engine dies, and SIGTERM draining both processes.

Two servers start in parallel: ``main`` (the default model, the official openai client; its
last test drains it) and ``doomed`` (a tiny random model; its engine gets killed).
"""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import openai
import pytest
from server_helpers import (
    ENGINE_STATE_GAUGES,
    api_server_pids,
    engine_core_pid,
    engine_idle_and_kv_full,
    listens_on,
    maps_torch,
    metrics,
    pid_alive,
    wait_until,
)

from graphrt.serve.launcher import ServerProcess

pytestmark = pytest.mark.default_model

KEY = "multi-key"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def servers(default_model_dir, tiny_model_factory) -> dict[str, ServerProcess]:
    tiny = tiny_model_factory("LlamaForCausalLM", max_position_embeddings=4096)
    common = ["--api-server-count", "2", "--cpu-kv-cache-gb", "0.02", "--max-num-seqs", "8"]
    procs = {
        "main": ServerProcess(
            [*common, "--api-key", KEY, "--max-model-len", "256", "--drain-timeout", "120"]
        ),
        "doomed": ServerProcess([*common, "--model", str(tiny)]),
    }
    try:
        for p in procs.values():
            p.start(wait=False)
        for p in procs.values():
            p.wait_healthy(300)
        # /health answers once the first API process listens; wait for the second too.
        for p in procs.values():
            wait_until("both API processes listen", lambda p=p: _num_listening(p) == 2)
        yield procs
    finally:
        for p in procs.values():
            p.stop()
            print(p.log_tail(3000))


@pytest.fixture(scope="module")
def client(servers) -> openai.OpenAI:
    url = servers["main"].base_url + "/v1"
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)


def _num_listening(server: ServerProcess) -> int:
    return sum(listens_on(pid, server.port) for pid in api_server_pids(server.proc.pid))


def _served_by(url: str) -> dict[str, float]:
    m = metrics(url)
    return {k: v for k, v in m.items() if k.startswith("graphrt_api_server_requests_total{")}


def test_processes_and_api_key(servers) -> None:
    server = servers["main"]
    assert len(api_server_pids(server.proc.pid)) == 2
    assert pid_alive(engine_core_pid(server.proc.pid))
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "a"}, timeout=30)
    assert r.status_code == 401


def test_requests_through_both_processes_get_their_own_outputs(servers, client) -> None:
    url = servers["main"].base_url
    want = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=8, temperature=0
    ).choices[0]
    # The kernel spreads connections over the two processes by a hash of the client's port: a
    # handful of batches makes it all but certain that both have served some.
    lengths = [3, 4, 5, 6, 7, 8]

    def one(i: int, results: list[str | None]) -> None:
        out = client.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt=PROMPT,
            max_tokens=lengths[i],
            temperature=0,
            stream=True,
        )
        results[i] = "".join(c.choices[0].text for c in out if c.choices)

    for _ in range(20):
        results: list[str | None] = [None] * len(lengths)
        threads = [threading.Thread(target=one, args=(i, results)) for i in range(len(lengths))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # Each stream got its own request's tokens, none of another's: greedy prefixes agree.
        for got in results:
            assert got is not None and want.text.startswith(got)
        if all(v > 0 for v in _served_by(url).values()):
            break
    served = _served_by(url)
    assert len(served) == 2 and all(v > 0 for v in served.values()), served
    # Both API processes have tokenized; neither they nor the supervisor loaded torch.
    supervisor = servers["main"].proc.pid
    assert not any(maps_torch(pid) for pid in [supervisor, *api_server_pids(supervisor)])
    assert maps_torch(engine_core_pid(supervisor))


def test_streaming_disconnect_aborts_and_frees_pages(servers) -> None:
    url = servers["main"].base_url
    body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    for _ in range(4):  # a few connections, so both processes likely see a disconnect
        with httpx.stream(
            "POST", url + "/v1/completions", json=body, headers=headers, timeout=120
        ) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
    wait_until("the engine is idle and every KV page is free",
               lambda: engine_idle_and_kv_full(url))  # fmt: skip
    assert metrics(url)["graphrt_request_failure_total:client_disconnect"] >= 4


def test_metrics_merge_both_processes(servers, client) -> None:
    url = servers["main"].base_url
    before = metrics(url)
    for _ in range(6):
        client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=4, temperature=0
        )
    after = metrics(url)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("graphrt_request_success_total:length") == 6
    assert grew("graphrt_time_to_first_token_seconds_count") == 6
    # One ITL sample per batch of outputs, and a lagging API batches several steps.
    assert 0 < grew("graphrt_inter_token_latency_seconds_count") <= 6 * 3
    assert grew("graphrt_generation_tokens_total") == 6 * 4
    assert sum(_served_by(url).values()) == after["graphrt_time_to_first_token_seconds_count"]
    assert after["graphrt_api_requests_in_flight"] == 0
    assert after["graphrt_engine_healthy"] == 1
    assert after["graphrt_kv_cache_usable_pages"] > 0
    assert after["graphrt_free_slots"] == after["graphrt_usable_slots"] == 8  # --max-num-seqs


def test_dead_engine_fails_health_on_every_process(servers) -> None:
    server = servers["doomed"]
    url = server.base_url
    body = {"prompt": [1, 2, 3], "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.kill(engine_core_pid(server.proc.pid), signal.SIGKILL)
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert "engine" in json.loads(rest[-2])["error"]["message"]
    # Every API process notices (it watches the engine's pid), not just the one streaming: ask
    # on several connections, which the kernel spreads over both.
    for _ in range(8):
        with httpx.Client() as fresh:
            health = fresh.get(url + "/health", timeout=10)
        assert health.status_code == 503
        assert "exited" in health.json()["error"]["message"]
        # The merged /metrics of either process: engine unhealthy, and none of the dead
        # engine's state reported (in multiprocess mode too).
        m = metrics(url)
        assert m["graphrt_engine_healthy"] == 0 and not set(m) & set(ENGINE_STATE_GAUGES)
    assert server.proc.poll() is None  # the API processes stay up to report it
    assert server.stop() == 0


def test_zz_sigterm_drains_both_processes_then_exits(servers) -> None:
    server = servers["main"]
    engine_pid = engine_core_pid(server.proc.pid)
    api_pids = api_server_pids(server.proc.pid)
    body = {
        "prompt": PROMPT, "max_tokens": 150, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", server.base_url + "/v1/completions", json=body, headers=headers, timeout=120
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        server.proc.send_signal(signal.SIGTERM)
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["usage"]["completion_tokens"] == 150  # ran to its end
    assert server.proc.wait(120) == 0, server.log_tail()
    for pid in [engine_pid, *api_pids]:
        wait_until(f"process {pid} has exited", lambda pid=pid: not pid_alive(pid))
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url + "/health", timeout=5)
