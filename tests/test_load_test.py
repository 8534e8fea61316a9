"""benchmarks/load_test.py on CPU: one short run end to end against a real server (default model),
through its command line as the GPU run uses it, and its helpers on synthetic data. Nothing here
depends on how fast the machine is."""

from __future__ import annotations

import argparse
import array
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from server_helpers import load_test_module

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
CHECKS = {
    "no_failures", "drained", "kv_released", "slots_released", "health_ok", "final_request_ok",
    "no_server_errors", "no_crash", "shutdown_clean", "rss_bound",
}  # fmt: skip


@pytest.fixture(scope="module")
def lt() -> ModuleType:
    return load_test_module()


@pytest.mark.default_model
def test_load_test_smoke_run(default_model_dir, tmp_path) -> None:
    out = tmp_path / "load.json"
    cmd = [
        sys.executable, str(BENCH / "load_test.py"),
        "--input-len", "8", "--output-len", "4", "--warmup", "1",
        "--saturation-concurrency", "3", "--saturation-requests", "6",
        "--duration", "3", "--sample-interval", "0.25", "--timeout", "120",
        "--json", str(out),
        "--", "--max-model-len", "128", "--cpu-kv-cache-gb", "0.02", "--max-num-seqs", "4",
        "--max-concurrent-requests", "6",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "verdict" in proc.stdout.splitlines()[-1]  # the table comes last
    d = json.loads(out.read_text())
    assert d["ok"] is True and set(d["checks"]) == CHECKS
    assert all(c["ok"] is True for c in d["checks"].values()), d["checks"]

    sat, load = d["saturation"], d["load"]
    assert sat["method"] == "closed loop" and sat["rate_rps"] > 0 and sat["sent"] == 6
    assert load["offered_rps"] == pytest.approx(1.2 * sat["rate_rps"])
    assert load["sent"] == load["completed"] + load["rejected"] + load["failed"]
    assert load["failed"] == 0 and load["completed"] >= 1
    assert set(load["rejected_by_status"]) <= {"503 server_overloaded"}
    for key in ("p50", "p90", "p99"):
        assert load["ttft_ms"][key] > 0
    assert load["tpot_ms"]["p99"] > 0 and load["itl_ms"]["p50"] > 0

    procs = d["rss"]["processes"]
    server = "supervisor" if "supervisor" in procs else "api"  # several API processes or one
    for role in (server, "engine_core"):
        p = procs[role]
        assert p["ok"] is True and p["first_mib"] > 0 and p["max_mib"] >= p["last_mib"]
    assert d["end_state"]["running"] == 0 and d["end_state"]["kv_usage"] == 0
    assert d["end_state"]["free_slots"] == d["end_state"]["usable_slots"] == 4  # --max-num-seqs
    assert d["checks"]["shutdown_clean"]["exit_code"] in (0, -15)
    assert set(d["phase_seconds"]) >= {"startup", "saturation", "load", "drain", "shutdown"}
    rss_ts, metrics_ts = d["rss_series"], d["metrics_series"]
    assert rss_ts and all({server, "engine_core"} <= set(s["rss_mib"]) for s in rss_ts)
    assert {s["phase"] for s in rss_ts} >= {"saturation", "load"}
    assert any("running" in s and "kv_usage" in s for s in metrics_ts)
    assert sum(b["sent"] for b in d["client_series"]) == load["sent"]


def test_parse_metrics_and_idle(lt) -> None:
    text = "\n".join(
        [
            "# HELP graphrt_num_requests_running x",
            'graphrt_num_requests_running{model_name="m"} 0.0',
            'graphrt_num_requests_waiting{model_name="m"} 0.0',
            'graphrt_api_requests_in_flight{model_name="m"} 0.0',
            'graphrt_kv_cache_usage_perc{model_name="m"} 0.0',
            'graphrt_kv_cache_free_pages{model_name="m"} 10.0',
            'graphrt_kv_cache_usable_pages{model_name="m"} 10.0',
            'graphrt_free_slots{model_name="m"} 4.0',
            'graphrt_usable_slots{model_name="m"} 4.0',
            'graphrt_engine_healthy{model_name="m"} 1.0',
            'graphrt_request_failure_total{model_name="m",reason="overloaded"} 3.0',
            'graphrt_request_failure_total{model_name="m",reason="engine_error"} 0.0',
            'graphrt_request_failure_created{model_name="m",reason="overloaded"} 1.7e9',
            'graphrt_request_success_total{model_name="m",finished_reason="length"} 5.0',
            'graphrt_e2e_request_latency_seconds_bucket{model_name="m",le="0.1"} 1.0',
        ]
    )
    m = lt.parse_metrics(text)
    assert m["graphrt_request_failure_total:overloaded"] == 3
    assert m["graphrt_request_success_total:length"] == 5
    assert not any("_bucket" in k or "_created" in k for k in m)
    s = lt.engine_state(m)
    assert s["failures"] == {"overloaded": 3} and lt.is_idle(s)
    assert not lt.is_idle({**s, "kv_free_pages": 9}) and not lt.is_idle({})
    assert not lt.is_idle({**s, "engine_healthy": 0})  # stale zeros of a dead engine
    assert all(c["ok"] for c in lt.state_checks((True, 0.1, s)).values())
    leaked = lt.state_checks((True, 0.1, {**s, "free_slots": 3.0}))
    assert leaked["slots_released"] == {"ok": False, "detail": "free=3.0 usable=4.0"}
    assert leaked["kv_released"]["ok"] and leaked["drained"]["ok"]


def _scrape(lt, metrics) -> dict:
    text = metrics.render()[0].decode()
    return lt.engine_state(lt.parse_metrics(text))


def test_checks_fail_on_a_dead_engine(lt) -> None:
    """What the server exports for a dead engine (its last stats said idle, all pages and slots
    free) never passes as drained or released; nor would NaN gauges."""
    from graphrt.serve.metrics import ServerMetrics

    m = ServerMetrics("m")
    idle = {
        "running": 0, "waiting": 0, "kv_usage": 0.0, "free_pages": 10, "usable_pages": 10,
        "free_slots": 4, "usable_slots": 4, "preemptions": 0,
    }  # fmt: skip
    m.update_engine(idle, healthy=True)
    alive = _scrape(lt, m)
    assert lt.is_idle(alive) and all(c["ok"] for c in lt.state_checks((True, 0, alive)).values())

    m.update_engine(idle, healthy=False)  # the API process's last stats, engine now dead
    dead = _scrape(lt, m)
    assert dead["engine_healthy"] == 0 and dead["in_flight"] == 0
    assert not set(dead) & {"running", "waiting", "kv_usage", "free_slots", "usable_slots"}
    assert not lt.is_idle(dead)
    checks = lt.state_checks((lt.is_idle(dead), 1.0, dead))
    assert {k: c["ok"] for k, c in checks.items()} == dict.fromkeys(checks, False)
    assert "NOT healthy" in checks["drained"]["detail"]

    nan = {**dead, **{k: float("nan") for k in ("running", "waiting", "kv_usage")}}
    nan.update({k: float("nan") for k in ("kv_free_pages", "kv_usable_pages")})
    nan.update(free_slots=float("nan"), usable_slots=float("nan"), engine_healthy=1.0)
    assert not lt.is_idle(nan)
    assert not any(c["ok"] for c in lt.state_checks((False, 1.0, nan)).values())


def test_classify(lt) -> None:
    R = lt.serving.Result
    assert lt.classify(R(True, output_tokens=4, status=200), 4) == ("ok", "")
    assert lt.classify(R(True, output_tokens=3, status=200), 4) == ("failed", "short output")
    assert lt.classify(R(True, output_tokens=3, status=200), None) == ("ok", "")
    overloaded = R(False, status=503, code="server_overloaded")
    assert lt.classify(overloaded, 4) == ("rejected", "503 server_overloaded")
    assert lt.classify(R(False, status=503), 4) == ("failed", "HTTP 503")  # engine unavailable
    assert lt.classify(R(False, status=500), 4) == ("failed", "HTTP 500")
    assert lt.classify(R(False, error="ConnectError"), 4) == ("failed", "connection error")
    assert lt.classify(R(False, status=200, error="boom"), 4) == ("failed", "error in stream")


def _outcome(lt, sent: float, end: float, kind: str = "ok", **kw) -> object:
    return lt.Outcome(sent, sent, end, kind, **kw)


def test_saturation_rate_skips_the_ramp(lt) -> None:
    # A burst of 4 completions at t=1 (the first wave), then one every 0.5 s; sends stop at t=6.
    outs = [_outcome(lt, 0.0, 1.0) for _ in range(4)]
    outs += [_outcome(lt, 0.0, 2.5 + 0.5 * i) for i in range(10)]
    # The window starts after the first third of the phase (t=2): 2.5 ... 6.0 in 4 s.
    assert lt.saturation_rate(outs, start=0.0, stop=6.0) == (pytest.approx(8 / 4.0), 2.0)
    # Nothing completed inside the window: the whole run's average.
    assert lt.saturation_rate(outs[:4], start=0.0, stop=6.0) == (4.0, 0.0)
    with pytest.raises(SystemExit):
        lt.saturation_rate([_outcome(lt, 0.0, 1.0, "failed")], start=0.0, stop=1.0)


def test_load_summary_counts_by_kind(lt) -> None:
    outs = [
        _outcome(lt, 0.1, 1.0, ttft=0.2, e2e=0.9, output_tokens=4, itl=array.array("d", [0.1])),
        _outcome(lt, 0.2, 0.3, "rejected", label="503 server_overloaded"),
        _outcome(lt, 0.3, 5.0, "failed", label="timeout", error="no end"),
    ]
    s = lt.load_summary(outs, rate=2.0, start=0.0, duration=2.0)
    assert (s["sent"], s["completed"], s["rejected"], s["failed"]) == (3, 1, 1, 1)
    assert s["rejected_by_status"] == {"503 server_overloaded": 1}
    assert s["failed_by_kind"] == {"timeout": 1} and s["errors"] == ["timeout: no end"]
    assert s["ttft_ms"]["p99"] == pytest.approx(200) and s["itl_ms"]["p50"] == pytest.approx(100)
    assert s["tpot_ms"]["p50"] == pytest.approx(700 / 3)
    bins = lt.client_series(outs, 0.0)
    assert sum(b["sent"] for b in bins) == 3 and bins[5]["failed"] == 1


def _rss_args(**kw) -> argparse.Namespace:
    base = dict(rss_warmup=10.0, rss_window=10.0, rss_growth_pct=5.0, rss_growth_mib=100.0)
    return argparse.Namespace(**{**base, **kw})


def test_rss_report_flags_growth_beyond_the_bound(lt) -> None:
    # Load from t=100 to t=160: the API process is flat, the engine grows 5 MiB a second.
    series = [
        {"t": 100.0 + i, "rss_mib": {"api": 500.0, "engine_core": 1000.0 + 5 * i}}
        for i in range(61)
    ]
    rep = lt.rss_report(series, 100.0, 160.0, _rss_args())
    assert rep["first_window_s"] == [10.0, 20.0] and rep["last_window_s"] == [50.0, 60.0]
    api, eng = rep["processes"]["api"], rep["processes"]["engine_core"]
    assert api["ok"] and api["growth_mib"] == 0 and api["allowed_growth_mib"] == 100
    assert not eng["ok"] and eng["growth_mib"] == pytest.approx(202.5)  # 1275 - 1072.5
    assert eng["first_mib"] == 1000 and eng["max_mib"] == eng["last_mib"] == 1300
    check = lt.rss_check(rep)
    assert check["ok"] is False and "engine_core +202.5" in check["detail"]
    # The percentage bound wins when it is the larger one.
    assert lt.rss_check(lt.rss_report(series, 100.0, 160.0, _rss_args(rss_growth_pct=25)))["ok"]
    assert lt.rss_check({"processes": {}})["ok"] is None  # not measured: no verdict
    # Samples sparser than the windows: the nearest one inside the load stands in.
    sparse = [s for s in series if s["t"] in (100.0, 130.0, 160.0)]
    eng = lt.rss_report(sparse, 100.0, 160.0, _rss_args())["processes"]["engine_core"]
    assert eng["samples_first_window"] == 0 and eng["first_window_median_mib"] == 1000
    assert eng["last_window_median_mib"] == 1300


def test_poisson_schedule_is_seeded_and_inside_the_duration(lt) -> None:
    args = lt.make_parser().parse_args(["--duration", "50", "--seed", "3"])
    a, b = lt.poisson_schedule(args, 4.0), lt.poisson_schedule(args, 4.0)
    assert a == b and a == sorted(a) and a[0] > 0 and a[-1] < 50
    assert 120 < len(a) < 280  # about 200 arrivals


def test_process_tree_rss_and_listening_pid(lt) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        roles = lt.process_tree(os.getpid())
        assert roles["api"] == os.getpid() and child.pid in roles.values()
        assert lt.rss_bytes(os.getpid()) > 1 << 20 and lt.rss_bytes(1 << 30) is None
    finally:
        child.kill()
        child.wait()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert lt.listening_pid(s.getsockname()[1]) == os.getpid()
