"""Load test (issue #8): open-loop traffic above the measured saturation rate for minutes, then
checks that the server survived it: no crash, no failed request, no leaked KV page or request
slot, no growth in resident memory beyond a stated bound. Reports p99 TTFT.

    # start a server with these flags, measure saturation, run 300 s at 1.2x, check, stop it
    python benchmarks/load_test.py --num-workers 4 --timeout 60 --json load.json -- \\
        --model benchmarks/models/llama-3.2-1b --load-format dummy --max-model-len 1024

    # or attach to a running server (loopback) at a given rate; it is left running
    python benchmarks/load_test.py --base-url http://127.0.0.1:8000 --rate 20 --duration 120

Phases: start-up (the server, unless attached); warm-up requests; saturation (closed loop at
``--saturation-concurrency`` for ``--saturation-duration`` s or ``--saturation-requests``; its
completed req/s is the saturation rate; skipped with ``--rate``); load (Poisson arrivals at
``--load-factor`` x that rate for ``--duration`` s); drain (the last responses, then until the
engine is idle); checks; shutdown (SIGTERM, must exit within ``--shutdown-timeout``).

Throughout, every ``--sample-interval`` s, the resident memory (RSS) of the server process and
of each of its descendants (the engine core, API processes) and the engine gauges of
``/metrics`` go into time series. Rejections (503 ``server_overloaded``, 429) are expected above
saturation and are counted by status, not as failures; connection errors, other 4xx/5xx (a 503
that is not an overload is an unavailable engine), errors inside a stream, short outputs and
requests that take longer than ``--timeout`` s are failures. The workload, its arrivals and the
HTTP client are ``serving.py``'s. Exit status: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # benchmarks/ is not a package; serving puts the checkout on sys.path too

MIB = 1 << 20
REJECT_CODES = ("server_overloaded",)  # with status 503: the server is at one of its limits
GAUGES = {
    "running": "graphrt_num_requests_running",
    "waiting": "graphrt_num_requests_waiting",
    "kv_usage": "graphrt_kv_cache_usage_perc",
    "kv_free_pages": "graphrt_kv_cache_free_pages",
    "kv_usable_pages": "graphrt_kv_cache_usable_pages",
    "free_slots": "graphrt_free_slots",
    "usable_slots": "graphrt_usable_slots",
    "in_flight": "graphrt_api_requests_in_flight",
    "preemptions": "graphrt_num_preemptions",
    "engine_healthy": "graphrt_engine_healthy",
}
FAILURE_METRIC = "graphrt_request_failure_total:"
SERVER_ERROR_REASONS = ("engine_error", "internal_error")


# ---- one request ----------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it. Times are wall-clock (``time.time()``), so the
    client processes' records line up with the sampler's."""

    scheduled: float
    sent: float
    end: float
    kind: str  # "ok", "rejected" or "failed"
    label: str = ""  # rejected: "503 server_overloaded"; failed: what went wrong
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: array.array = field(default_factory=lambda: array.array("d"))


def classify(r: serving.Result, expected_tokens: int | None) -> tuple[str, str]:
    """(kind, label) of a finished request."""
    if r.ok:
        if expected_tokens is not None and r.output_tokens != expected_tokens:
            return "failed", "short output"
        return "ok", ""
    if r.status == 429 or (r.status == 503 and r.code in REJECT_CODES):
        return "rejected", f"{r.status} {r.code or ''}".strip()
    if r.status is None:
        return "failed", "connection error"
    if r.status == 200:
        return "failed", "error in stream"
    return "failed", f"HTTP {r.status}" + (f" {r.code}" if r.code else "")


async def send_one(
    client: httpx.AsyncClient,
    cfg: argparse.Namespace,
    model: str,
    job: serving.Job,
    scheduled: float | None = None,
) -> Outcome:
    """Send one streaming request; it fails as hung after ``cfg.timeout`` s in all."""
    path, body = serving.request_body(cfg, model, job)
    sent = time.time()
    scheduled = sent if scheduled is None else scheduled
    try:
        r = await asyncio.wait_for(
            serving.one_request(client, path, body, cfg.timeout), cfg.timeout
        )
    except asyncio.TimeoutError:
        err = f"no end after {cfg.timeout:g} s"
        return Outcome(scheduled, sent, time.time(), "failed", "timeout", err)
    kind, label = classify(r, job.output_len if cfg.ignore_eos else None)
    return Outcome(
        scheduled,
        sent,
        time.time(),
        kind,
        label,
        r.error,
        ttft=r.ttft,
        e2e=r.e2e,
        output_tokens=r.output_tokens,
        prompt_tokens=r.prompt_tokens,
        itl=array.array("d", r.itl),
    )


# ---- client processes -----------------------------------------------------------------------


async def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def closed_loop(
    cfg: argparse.Namespace,
    base_url: str,
    model: str,
    jobs: list[serving.Job],
    concurrency: int,
    start_at: float,
    stop_at: float,
    max_requests: int | None,
) -> list[Outcome]:
    """``concurrency`` users, each sending its next request when the last one ends, until
    ``stop_at`` or until ``max_requests`` were sent."""
    out: list[Outcome] = []
    pool = itertools.cycle(jobs)
    issued = 0
    async with serving.http_client(base_url, cfg.api_key) as client:
        await _sleep_until(start_at)

        async def user() -> None:
            nonlocal issued
            while time.time() < stop_at and (max_requests is None or issued < max_requests):
                issued += 1
                o = await send_one(client, cfg, model, next(pool))
                out.append(o)
                if o.kind != "ok":  # don't spin on a full server
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return out


async def open_loop(
    cfg: argparse.Namespace,
    base_url: str,
    model: str,
    jobs: list[serving.Job],
    job_index: list[int],
    send_at: list[float],
    start_at: float,
) -> list[Outcome]:
    """Send ``jobs[job_index[i]]`` at ``start_at + send_at[i]`` whatever is in flight."""
    async with serving.http_client(base_url, cfg.api_key) as client:
        tasks = []
        for i, at in zip(job_index, send_at):
            await _sleep_until(start_at + at)
            job = jobs[i % len(jobs)]
            tasks.append(asyncio.create_task(send_one(client, cfg, model, job, start_at + at)))
        return list(await asyncio.gather(*tasks))


def _run_closed(payload: tuple) -> list[Outcome]:
    return asyncio.run(closed_loop(*payload))


def _run_open(payload: tuple) -> list[Outcome]:
    return asyncio.run(open_loop(*payload))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (k < total % parts) for k in range(parts)]


# ---- server processes and metrics -----------------------------------------------------------


def _ppid(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _read(pid: int, name: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _role(pid: int) -> str:
    """What a server's descendant is, from its process name (graphrt sets them) or command."""
    comm, cmd = _read(pid, "comm"), _read(pid, "cmdline")
    if comm == "graphrt-engine":
        return "engine_core"
    if comm.startswith("graphrt-api-"):
        return "api_" + comm.rsplit("-", 1)[1]
    if "resource_tracker" in cmd:
        return "resource_tracker"
    if "spawn_main" in cmd:  # a server that does not name its processes
        return "engine_core"
    return f"{comm or 'process'}:{pid}"


def process_tree(root: int) -> dict[str, int]:
    """{role: pid} of the server process ``root`` and its live descendants. The roles:
    "engine_core"; "api" (``root`` when it serves HTTP itself) or "supervisor" and "api_<i>"
    (with several API processes); helpers ("resource_tracker", "<name>:<pid>")."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            ppid = _ppid(entry.name)
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry.name))
    roles: dict[str, int] = {}
    todo = sorted(children.get(root, []))
    for pid in todo:  # breadth first: the engine core is named before anything it starts
        todo.extend(sorted(children.get(pid, [])))
        role = _role(pid)
        roles[role if role not in roles else f"{role}:{pid}"] = pid
    if Path(f"/proc/{root}").exists():
        several = any(r.startswith("api_") for r in roles)
        roles = {"supervisor" if several else "api": root, **roles}
    return roles


def is_main_role(role: str) -> bool:
    """The server's own processes (checked for RSS growth), not helpers."""
    return (
        role in ("api", "supervisor", "engine_core") or re.fullmatch(r"api_\d+", role) is not None
    )


def rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def listening_pid(port: int) -> int | None:
    """The process that owns the TCP socket listening on ``port`` (the server's API process),
    from /proc; None if it cannot be seen (another user's process, or not Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    holders = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) in inodes:
                    holders.add(int(entry.name))
                    break
    roots = [p for p in holders if _ppid(str(p)) not in holders]
    if not roots:
        return None
    pid = min(roots)
    # One of several API processes: the server is their supervisor.
    return _ppid(str(pid)) if _read(pid, "comm").startswith("graphrt-api-") else pid


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {name: value}; a ``reason``/``finished_reason`` label becomes
    ``name:reason``; other labels are summed over. Buckets are dropped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        if name.endswith(("_bucket", "_created")):
            continue
        m = re.search(r'(?:^|,)(?:finished_)?reason="([^"]*)"', labels)
        if m:
            name = f"{name}:{m.group(1)}"
        out[name] = out.get(name, 0.0) + float(value)
    return out


def engine_state(m: dict[str, float]) -> dict[str, Any]:
    """The gauges the checks use, and the failure counters that are not zero."""
    s: dict[str, Any] = {k: m[name] for k, name in GAUGES.items() if name in m}
    s["failures"] = {
        k[len(FAILURE_METRIC) :]: v for k, v in m.items() if k.startswith(FAILURE_METRIC) and v
    }
    return s


def is_idle(s: dict[str, Any]) -> bool:
    """Nothing running, waiting or in flight, every KV page free, in a healthy engine's gauges
    (a dead engine is never idle, whatever gauges a server reports for it)."""
    try:
        return (
            s["engine_healthy"] == 1
            and s["running"] == 0
            and s["waiting"] == 0
            and s["in_flight"] == 0
            and s["kv_free_pages"] == s["kv_usable_pages"]
        )
    except KeyError:
        return False


class Sampler:
    """Every ``interval`` s, on two threads so a slow ``/metrics`` never delays the other: the
    RSS of each server process (``rss_series``) and the engine's gauges (``metrics_series``)."""

    def __init__(self, base_url: str, root_pid: int | None, interval: float, t0: float) -> None:
        self.base_url, self.root_pid, self.interval, self.t0 = base_url, root_pid, interval, t0
        self.phase = "start"
        self.rss_series: list[dict[str, Any]] = []
        self.metrics_series: list[dict[str, Any]] = []
        self.pids: dict[str, list[int]] = {}  # role -> every pid seen in it
        self._stop_event = threading.Event()
        self._threads = [
            threading.Thread(target=self._every, args=(self._rss, self.rss_series), daemon=True),
            threading.Thread(target=self._scrapes, daemon=True),
        ]
        if root_pid is None:
            self._threads.pop(0)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop_event.set()
        for t in self._threads:
            t.join(30)

    def _every(self, sample: Callable[[], dict[str, Any]], out: list[dict[str, Any]]) -> None:
        due = time.time()
        while not self._stop_event.is_set():
            s: dict[str, Any] = {"t": round(time.time() - self.t0, 3), "phase": self.phase}
            s.update(sample())
            out.append(s)
            due = max(due + self.interval, time.time())
            self._stop_event.wait(due - time.time())

    def _rss(self) -> dict[str, Any]:
        rss = {}
        for role, pid in process_tree(self.root_pid).items():
            b = rss_bytes(pid)
            if b is not None:
                rss[role] = round(b / MIB, 1)
                if pid not in self.pids.setdefault(role, []):
                    self.pids[role].append(pid)
        return {"rss_mib": rss}

    def _scrapes(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=max(5.0, 5 * self.interval)) as http:

            def scrape() -> dict[str, Any]:
                t = time.time()
                try:
                    s = engine_state(parse_metrics(http.get("/metrics").text))
                except httpx.HTTPError as e:
                    return {"scrape_error": f"{type(e).__name__}: {e}"}
                s["scrape_ms"] = round((time.time() - t) * 1000, 1)
                return s

            self._every(scrape, self.metrics_series)


# ---- statistics -----------------------------------------------------------------------------


def pcts(values: Any, qs: tuple[int, ...] = (50, 90, 99), scale: float = 1000.0) -> dict:
    """Mean, max and nearest-rank percentiles ``p<q>``, in ms by default."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"mean": None, **{f"p{q}": None for q in qs}, "max": None}
    out = {"mean": float(a.mean()) * scale}
    for q, v in zip(qs, np.percentile(a, qs, method="nearest")):
        out[f"p{q}"] = float(v) * scale
    out["max"] = float(a.max()) * scale
    return out


def count_by(outcomes: list[Outcome], kind: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        if o.kind == kind:
            out[o.label] = out.get(o.label, 0) + 1
    return dict(sorted(out.items()))


def saturation_rate(outcomes: list[Outcome], start: float, stop: float) -> tuple[float, float]:
    """(completed req/s, window start): completions in the window from the first completion or
    the end of the phase's first third, whichever is later (the closed loop starts with every
    user at once, so its first wave ends in a burst), to ``stop``, when new requests stopped.
    The whole run's average if no request completed in that window."""
    ends = sorted(o.end for o in outcomes if o.kind == "ok")
    if not ends:
        raise SystemExit("saturation phase: no request completed; see the errors above")
    t_a = max(ends[0], start + (stop - start) / 3)
    n = sum(1 for e in ends if t_a < e <= stop)
    if n and stop > t_a:
        return n / (stop - t_a), t_a
    first = min(o.sent for o in outcomes)
    return len(ends) / (ends[-1] - first), first


def load_summary(outcomes: list[Outcome], rate: float, start: float, duration: float) -> dict:
    ok = [o for o in outcomes if o.kind == "ok"]
    end = max((o.end for o in outcomes), default=start)
    in_window = [o for o in ok if o.end <= start + duration]
    lags = [max(0.0, o.sent - o.scheduled) for o in outcomes]
    tpot = [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    itl = np.concatenate([np.frombuffer(o.itl, dtype=np.float64) for o in ok] or [np.zeros(0)])
    failed = [o for o in outcomes if o.kind == "failed"]
    return {
        "offered_rps": rate,
        "duration_s": duration,
        "sent": len(outcomes),
        "sent_rps": len(outcomes) / duration,
        "completed": len(ok),
        "completed_rps": len(ok) / max(end - start, 1e-9),
        "completed_in_window_rps": len(in_window) / duration,
        "completed_second_half_rps": sum(o.end > start + duration / 2 for o in in_window)
        / (duration / 2),
        "output_tok_s": sum(o.output_tokens for o in in_window) / duration,
        "rejected": sum(count_by(outcomes, "rejected").values()),
        "rejected_by_status": count_by(outcomes, "rejected"),
        "failed": len(failed),
        "failed_by_kind": count_by(outcomes, "failed"),
        "errors": sorted({f"{o.label}: {o.error}"[:300] for o in failed})[:10],
        "send_lag_ms": pcts(lags, (50, 99)),
        "last_response_s": end - start,
        "ttft_ms": pcts([o.ttft for o in ok]),
        "tpot_ms": pcts(tpot, (50, 99)),
        "itl_ms": pcts(itl, (50, 99)),
        "e2e_ms": pcts([o.e2e for o in ok], (50, 99)),
    }


def client_series(outcomes: list[Outcome], start: float) -> list[dict[str, int]]:
    """Per second of the load phase: requests sent, and those that ended by kind."""
    end = max((o.end for o in outcomes), default=start)
    zero = {"sent": 0, "ok": 0, "rejected": 0, "failed": 0}
    bins = [{"t": k, **zero} for k in range(int(end - start) + 1)]
    for o in outcomes:
        bins[max(0, int(o.sent - start))]["sent"] += 1
        bins[max(0, int(o.end - start))][o.kind] += 1
    return bins


def _nearest(vals: list[tuple[float, float]], window: tuple[float, float]) -> list[float]:
    mid = (window[0] + window[1]) / 2
    return [min(vals, key=lambda tv: abs(tv[0] - mid))[1]] if vals else []


def rss_report(
    series: list[dict[str, Any]], t_start: float, t_end: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Median RSS of each process in the last window of the load phase against its first
    window after the warm-up (``t_*`` relative to the series' clock)."""
    span = t_end - t_start
    warm = min(args.rss_warmup, span / 3)
    win = min(args.rss_window, (span - warm) / 2)
    first_w, last_w = (t_start + warm, t_start + warm + win), (t_end - win, t_end)
    roles = sorted({r for s in series for r in s.get("rss_mib", {})})
    procs = {}
    for role in roles:
        vals = [(s["t"], s["rss_mib"][role]) for s in series if role in s.get("rss_mib", {})]
        first = [v for t, v in vals if first_w[0] <= t < first_w[1]]
        last = [v for t, v in vals if last_w[0] <= t <= last_w[1]]
        p: dict[str, Any] = {
            "first_mib": vals[0][1],
            "last_mib": vals[-1][1],
            "max_mib": max(v for _, v in vals),
            "samples_first_window": len(first),
            "samples_last_window": len(last),
        }
        # A window shorter than the sampling gap (a short run on a starved machine) takes the
        # sample nearest to it, if that one was taken during the load.
        inside = [(t, v) for t, v in vals if t_start <= t <= t_end]
        first = first or _nearest(inside, first_w)
        last = last or _nearest(inside, last_w)
        if first and last:
            a, b = float(np.median(first)), float(np.median(last))
            allowed = max(args.rss_growth_pct / 100 * a, args.rss_growth_mib)
            p.update(first_window_median_mib=a, last_window_median_mib=b, growth_mib=b - a)
            p.update(allowed_growth_mib=allowed, ok=b - a <= allowed)
        procs[role] = p
    return {
        "bound": f"median RSS of the last {win:.0f} s of load minus that of {warm:.0f}-"
        f"{warm + win:.0f} s <= max({args.rss_growth_pct:g}% of the latter, "
        f"{args.rss_growth_mib:g} MiB), per process",
        "growth_pct": args.rss_growth_pct,
        "growth_mib": args.rss_growth_mib,
        "first_window_s": [round(x - t_start, 1) for x in first_w],
        "last_window_s": [round(x - t_start, 1) for x in last_w],
        "processes": procs,
    }


# ---- phases ---------------------------------------------------------------------------------


def workload_args(args: argparse.Namespace, **extra: Any) -> argparse.Namespace:
    """The namespace serving.py's helpers read."""
    ns = argparse.Namespace(**vars(args))
    ns.num_prompts = args.num_distinct_prompts
    ns.request_rate = float("inf")
    ns.__dict__.update(extra)
    return ns


def poisson_schedule(args: argparse.Namespace, rate: float) -> list[float]:
    """Send times (s from the start) of ``rate`` req/s arrivals over ``--duration`` s."""
    ns = workload_args(args, request_rate=rate, seed=args.seed + 17)
    n = int(rate * args.duration * 1.2) + 20
    while True:
        at = list(itertools.accumulate(serving.arrival_gaps(ns, n)))
        if at[-1] >= args.duration:
            return [t for t in at if t < args.duration]
        n *= 2


def measure_saturation(
    args: argparse.Namespace, pool: ProcessPoolExecutor, base_url: str, model: str, jobs: list
) -> tuple[dict[str, Any], list[Outcome]]:
    w = min(args.num_workers, args.saturation_concurrency)
    conc = _split(args.saturation_concurrency, w)
    reqs = _split(args.saturation_requests, w) if args.saturation_requests else [None] * w
    start_at = time.time() + 2.0  # the client processes start
    stop_at = start_at + args.saturation_duration
    parts = []
    for k in range(w):  # each client process starts at its own place in the prompt pool
        mine = jobs[k * len(jobs) // w :] + jobs[: k * len(jobs) // w]
        parts.append((args, base_url, model, mine, conc[k], start_at, stop_at, reqs[k]))
    outcomes = [o for part in pool.map(_run_closed, parts) for o in part]
    stop = min(stop_at, max(o.sent for o in outcomes))
    rate, t_a = saturation_rate(outcomes, start_at, stop)
    ok = [o for o in outcomes if o.kind == "ok"]
    info = {
        "method": "closed loop",
        "concurrency": args.saturation_concurrency,
        "sent": len(outcomes),
        "completed": len(ok),
        "rejected_by_status": count_by(outcomes, "rejected"),
        "failed_by_kind": count_by(outcomes, "failed"),
        "window_s": stop - t_a,
        "rate_rps": rate,
        "output_tok_s": rate * float(np.mean([o.output_tokens for o in ok])),
        "ttft_ms": pcts([o.ttft for o in ok], (50, 99)),
        "tpot_ms": pcts(
            [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1], (50,)
        ),
    }
    return info, outcomes


def start_load(
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
    base_url: str,
    model: str,
    jobs: list,
    rate: float,
) -> tuple[list[Future], float]:
    """Hand the Poisson schedule to the client processes; returns their futures and the wall
    time of the schedule's zero."""
    send_at = poisson_schedule(args, rate)
    w = max(1, min(args.num_workers, len(send_at)))
    start_at = time.time() + 1.0
    idx = list(range(len(send_at)))
    parts = [(args, base_url, model, jobs, idx[k::w], send_at[k::w], start_at) for k in range(w)]
    return [pool.submit(_run_open, p) for p in parts], start_at


def wait_drained(http: httpx.Client, timeout: float) -> tuple[bool, float, dict[str, Any]]:
    t0 = time.time()
    state: dict[str, Any] = {}
    while True:
        with contextlib.suppress(httpx.HTTPError):
            state = engine_state(parse_metrics(http.get("/metrics").text))
            if is_idle(state):
                return True, time.time() - t0, state
        if time.time() - t0 > timeout:
            return False, time.time() - t0, state
        time.sleep(0.2)


def final_request(http: httpx.Client, args: argparse.Namespace, model: str, job) -> tuple:
    """One small non-streaming request after the load; it must succeed in full."""
    job = serving.Job(job.prompt[:32] if isinstance(job.prompt, list) else job.prompt, 4)
    path, body = serving.request_body(args, model, job)
    body.update(stream=False, ignore_eos=True)
    body.pop("stream_options", None)
    try:
        r = http.post(path, json=body, timeout=args.timeout)
    except httpx.HTTPError as e:
        return False, f"{type(e).__name__}: {e}"
    if r.status_code != 200:
        return False, f"HTTP {r.status_code}: {r.text[:300]}"
    n = r.json().get("usage", {}).get("completion_tokens")
    return n == 4, f"HTTP 200, {n} of 4 tokens"


def shutdown(server: Any, pids: list[int], timeout: float) -> dict[str, Any]:
    """SIGTERM; the server must exit (code 0 or -SIGTERM) and its children with it."""
    proc = server.proc
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
        in_time = True
    except subprocess.TimeoutExpired:
        in_time, code = False, server.stop(timeout=5)
    seconds = time.time() - t0
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    ok = in_time and code in (0, -signal.SIGTERM) and not left
    detail = f"exit code {code} after {seconds:.1f} s" + (
        "" if in_time else f" (killed: no exit within {timeout:g} s)"
    )
    if left:
        detail += f"; still running: {left}"
    return {"ok": ok, "detail": detail, "seconds": seconds, "exit_code": code}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child has exited; its parent has not reaped it yet.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def raise_fd_limit() -> int:
    """Raise the open-file limit to the hard limit (the server started here inherits it): at
    overload there are as many sockets as --max-concurrent-requests, plus rejected ones."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---- checks and report ----------------------------------------------------------------------


def _check(ok: bool | None, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail}


def crash_check(sampler: Sampler, server: Any, root_pid: int | None) -> dict[str, Any]:
    """The server and its engine stayed up: alive now, engine healthy in every scrape, and no
    role's process replaced by another."""
    scrapes = [s for s in sampler.metrics_series if "engine_healthy" in s]
    unhealthy = [s["t"] for s in scrapes if s["engine_healthy"] != 1]
    replaced = {r: p for r, p in sampler.pids.items() if len(p) > 1}
    alive = server.proc.poll() is None if server else (root_pid is None or _alive(root_pid))
    engines = [p[0] for r, p in sampler.pids.items() if r.startswith("engine_core")]
    engine_alive = all(_alive(p) for p in engines)
    failed_scrapes = sum("scrape_error" in s for s in sampler.metrics_series)
    ok = alive and engine_alive and not unhealthy and not replaced
    detail = (
        f"server {'alive' if alive else 'DEAD'}, engine core {engines or '?'} "
        f"{'alive' if engine_alive else 'DEAD'}, engine unhealthy in {len(unhealthy)} of "
        f"{len(scrapes)} scrapes"
        + (f" (first at t={unhealthy[0]} s)" if unhealthy else "")
        + (f", processes replaced: {replaced}" if replaced else "")
        + f", {failed_scrapes} failed scrapes"
    )
    return _check(ok, detail)


def state_checks(drained: tuple) -> dict[str, dict[str, Any]]:
    """The end-of-run checks on the engine's gauges: drained, and every KV page and request slot
    free again. A gauge the server does not export (it leaves the engine's state out while the
    engine is unhealthy or dead) fails its check; so does NaN."""
    ok_drain, drain_s, state = drained
    unhealthy = "" if state.get("engine_healthy") == 1 else ", engine NOT healthy"
    checks: dict[str, dict[str, Any]] = {}
    checks["drained"] = _check(
        ok_drain,
        f"running={state.get('running')} waiting={state.get('waiting')} "
        f"in_flight={state.get('in_flight')} after {drain_s:.1f} s{unhealthy}",
    )
    checks["kv_released"] = _check(
        state.get("kv_usage") == 0 and state.get("kv_free_pages") == state.get("kv_usable_pages"),
        f"kv_usage={state.get('kv_usage')} free={state.get('kv_free_pages')} "
        f"usable={state.get('kv_usable_pages')}",
    )
    free, usable = state.get("free_slots"), state.get("usable_slots")
    checks["slots_released"] = _check(
        usable is not None and usable > 0 and free == usable, f"free={free} usable={usable}"
    )
    return checks


def end_checks(
    http: httpx.Client, args: argparse.Namespace, model: str, jobs: list, drained: tuple
) -> dict[str, dict[str, Any]]:
    checks = state_checks(drained)
    try:
        h = http.get("/health")
        checks["health_ok"] = _check(h.status_code == 200, f"HTTP {h.status_code}")
    except httpx.HTTPError as e:
        checks["health_ok"] = _check(False, f"{type(e).__name__}: {e}")
    checks["final_request_ok"] = _check(*final_request(http, args, model, jobs[0]))
    return checks


def server_error_check(sampler: Sampler, end_state: dict[str, Any]) -> dict[str, Any]:
    """The server's own count of engine errors and 500s did not grow during the run."""
    first = next((s["failures"] for s in sampler.metrics_series if "failures" in s), {})
    last = end_state.get("failures", {})
    grew = {
        r: last.get(r, 0) - first.get(r, 0)
        for r in SERVER_ERROR_REASONS
        if last.get(r, 0) > first.get(r, 0)
    }
    return _check(not grew, f"server failure counters grew: {grew}" if grew else "none")


def rss_check(rss: dict[str, Any]) -> dict[str, Any]:
    procs = rss["processes"]
    if not procs:
        return _check(None, "not measured: the server's process is not visible here")
    bad = [r for r, p in procs.items() if p.get("ok") is False]
    unmeasured = [r for r, p in procs.items() if is_main_role(r) and "ok" not in p]
    parts = [
        f"{r} {p['growth_mib']:+.1f} MiB (<= {p['allowed_growth_mib']:.0f})"
        for r, p in procs.items()
        if "growth_mib" in p and (is_main_role(r) or not p["ok"])
    ]
    detail = ", ".join(parts) + (f"; no samples in a window for {unmeasured}" if unmeasured else "")
    return _check(not bad and not unmeasured, detail)


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rep: dict[str, Any]) -> None:
    load, sat = rep["load"], rep["saturation"]
    print(
        f"\ngraphrt load test: {rep['model']}, {load['duration_s']:g} s of Poisson arrivals at "
        f"{rep['config']['load_factor']:g} x {sat['rate_rps']:.2f} req/s ({sat['method']})"
    )
    rows = [
        ("phases (s)", "  ".join(f"{k} {v:.1f}" for k, v in rep["phase_seconds"].items())),
        ("requests", f"sent {load['sent']}  completed {load['completed']}  "
         f"rejected {load['rejected']} {load['rejected_by_status'] or ''}  "
         f"failed {load['failed']} {load['failed_by_kind'] or ''}"),
        ("rate (req/s)", f"offered {load['offered_rps']:.2f}  sent {load['sent_rps']:.2f}  "
         f"completed {load['completed_in_window_rps']:.2f} (2nd half "
         f"{load['completed_second_half_rps']:.2f})  saturation {sat['rate_rps']:.2f}"),
        ("output tok/s", f"{load['output_tok_s']:.1f}"),
        ("client send lag (ms)", f"p50 {_fmt(load['send_lag_ms']['p50'])}  "
         f"p99 {_fmt(load['send_lag_ms']['p99'])}  (grows when the clients are the bottleneck)"),
    ]  # fmt: skip
    for key, qs in (("ttft_ms", (50, 90, 99)), ("tpot_ms", (50, 99)), ("itl_ms", (50, 99))):
        text = "  ".join(f"p{q} {_fmt(load[key][f'p{q}'])}" for q in qs)
        rows.append((key[:-3].upper() + " (ms)", text))
    for role, p in rep["rss"]["processes"].items():
        if not is_main_role(role) and p.get("ok") is not False:
            continue  # helpers and short-lived processes: in the JSON
        text = f"first {p['first_mib']:.0f}  last {p['last_mib']:.0f}  max {p['max_mib']:.0f}"
        if "growth_mib" in p:
            text += f"  growth {p['growth_mib']:+.1f} (<= {p['allowed_growth_mib']:.0f})"
        rows.append((f"RSS {role} (MiB)", text))
    rows.append(("RSS bound", rep["rss"]["bound"]))
    verdicts = {True: "PASS", False: "FAIL", None: "skip"}
    for name, c in rep["checks"].items():
        rows.append((name, f"{verdicts[c['ok']]}  {c['detail']}"))
    rows.append(("verdict", "PASS" if rep["ok"] else "FAIL"))
    for k, v in rows:
        print(f"{k:<24}{v}")


# ---- main -----------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add(
        "--base-url",
        default=None,
        help="attach to this running server (loopback) instead of "
        "starting one with the flags after `--`",
    )
    add(
        "--server-pid",
        type=int,
        default=None,
        help="with --base-url: the server's process "
        "(default: the one listening on the URL's port, from /proc)",
    )
    add("--api-key", default=None)
    add("--model", default=None, help="model name to send (default: the server's first)")
    w = p.add_argument_group("workload (serving.py's)")
    serving.add_workload_args(w, input_len=256, range_ratio=0.5)
    w.add_argument(
        "--num-distinct-prompts",
        type=int,
        default=1024,
        help="seeded prompt/length pairs, used in turn",
    )
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson")
    w.add_argument("--warmup", type=int, default=2, help="requests sent before anything")
    w.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds a request may take in all before it counts as hung",
    )
    w.add_argument("--num-workers", type=int, default=1, help="client processes")
    s = p.add_argument_group("phases")
    s.add_argument(
        "--rate",
        type=float,
        default=None,
        help="saturation rate in req/s; skips the saturation phase",
    )
    s.add_argument(
        "--saturation-concurrency",
        type=int,
        default=None,
        help="closed-loop users (default: twice the server's --max-num-seqs, so a request is "
        "always waiting for a free row)",
    )
    s.add_argument("--saturation-duration", type=float, default=30.0)
    s.add_argument(
        "--saturation-requests",
        type=int,
        default=None,
        help="end the saturation phase after this many requests (or the duration)",
    )
    s.add_argument("--load-factor", type=float, default=1.2)
    s.add_argument("--duration", type=float, default=300.0, help="seconds of open-loop load")
    c = p.add_argument_group("checks")
    c.add_argument("--sample-interval", type=float, default=1.0, help="seconds between samples")
    c.add_argument(
        "--rss-warmup",
        type=float,
        default=60.0,
        help="seconds of load before the first RSS window (at most a third of it)",
    )
    c.add_argument("--rss-window", type=float, default=60.0, help="seconds per RSS window")
    c.add_argument("--rss-growth-pct", type=float, default=5.0)
    c.add_argument(
        "--rss-growth-mib",
        type=float,
        default=256.0,
        help="allowed growth: the larger of the two bounds",
    )
    c.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds after the last response for the engine to be idle",
    )
    c.add_argument("--shutdown-timeout", type=float, default=60.0)
    c.add_argument("--startup-timeout", type=float, default=1800.0)
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, help="write the report here")
    o.add_argument("--server-log", default=None, help="the started server's log (default: tmp)")
    return p


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv, server_args = serving.split_server_args(argv)
    args = make_parser().parse_args(argv)
    positive = ("duration", "load_factor", "timeout", "sample_interval", "saturation_duration")
    for name in positive:
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0")
    if args.rate is not None and args.rate <= 0:
        raise SystemExit("--rate must be > 0")
    if args.saturation_concurrency is None:
        args.saturation_concurrency = 2 * max_num_seqs(server_args)
    if min(args.saturation_concurrency, args.num_workers, args.num_distinct_prompts) < 1:
        raise SystemExit("--saturation-concurrency, --num-workers, --num-distinct-prompts >= 1")
    if args.base_url and server_args:
        raise SystemExit("server flags after `--` need no --base-url (the server is started here)")
    return args, server_args


def max_num_seqs(server_args: list[str]) -> int:
    """The engine's --max-num-seqs among the server flags, else its default."""
    for i, a in enumerate(server_args):
        if a.startswith("--max-num-seqs="):
            return int(a.split("=", 1)[1])
        if a == "--max-num-seqs" and i + 1 < len(server_args):
            return int(server_args[i + 1])
    from graphrt.config import EngineConfig

    return EngineConfig.max_num_seqs


def start_server(args: argparse.Namespace, server_args: list[str]) -> tuple[Any, str, int | None]:
    from graphrt.serve.launcher import ServerProcess, is_loopback

    if args.base_url:
        url = urlparse(args.base_url)
        if not is_loopback(url.hostname or ""):
            raise SystemExit(f"--base-url must be a loopback address, not {url.hostname!r}")
        pid = args.server_pid or listening_pid(url.port or 80)
        return None, args.base_url.rstrip("/"), pid
    if args.api_key:
        server_args = ["--api-key", args.api_key, *server_args]
    server = ServerProcess(server_args, log_path=args.server_log)
    print(f"starting the server (log: {server.log_path})", flush=True)
    server.start(timeout=args.startup_timeout)
    return server, server.base_url, server.proc.pid


class Phases:
    """Wall time of each phase, and the sampler's phase label."""

    def __init__(self, sampler: Sampler | None) -> None:
        self.sampler, self.seconds, self._name, self._t = sampler, {}, None, time.time()

    def __call__(self, name: str) -> None:
        now = time.time()
        if self._name:
            self.seconds[self._name] = now - self._t
        self._name, self._t = name, now
        if self.sampler and name:
            self.sampler.phase = name
        if name:
            print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, server_args = parse(argv)
    t0 = time.time()
    fd_limit = raise_fd_limit()
    server, base_url, root_pid = start_server(args, server_args)
    sampler = Sampler(base_url, root_pid, args.sample_interval, t0)
    phases = Phases(sampler)
    phases.seconds["startup"] = time.time() - t0
    sampler.start()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    ctx = multiprocessing.get_context("spawn")
    try:
        with (
            httpx.Client(base_url=base_url, headers=headers, timeout=30) as http,
            ProcessPoolExecutor(args.num_workers, mp_context=ctx) as pool,
        ):
            phases("warmup")
            model = asyncio.run(serving.prepare(workload_args(args), base_url))
            jobs = serving.make_jobs(workload_args(args))
            rep = run_phases(args, pool, http, base_url, model, jobs, phases, sampler)
        phases("")
    except BaseException:
        sampler.stop()
        if server is not None:
            print(server.log_tail(3000), file=sys.stderr)
            server.stop()
        raise
    sampler.stop()
    rep["checks"]["no_crash"] = crash_check(sampler, server, root_pid)
    if server is not None:
        phases("shutdown")
        pids = [p for ps in sampler.pids.values() for p in ps]
        rep["checks"]["shutdown_clean"] = sd = shutdown(server, pids, args.shutdown_timeout)
        phases("")
        if not sd["ok"]:
            print(server.log_tail(3000), file=sys.stderr)
    rep["rss"] = rss_report(sampler.rss_series, *rep.pop("_load_window"), args)
    rep["checks"]["rss_bound"] = rss_check(rep["rss"])
    rep["ok"] = all(c["ok"] is not False for c in rep["checks"].values())
    rep.update(
        model=model,
        config={**{k: _jsonable(v) for k, v in vars(args).items()}, "server_args": server_args},
        server={
            "base_url": base_url,
            "launched": server is not None,
            "pid": root_pid,
            "pids": sampler.pids,
            "fd_limit": fd_limit,
        },
        phase_seconds=phases.seconds,
        rss_series=sampler.rss_series,
        metrics_series=sampler.metrics_series,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    print_table(rep)
    return 0 if rep["ok"] else 1


def run_phases(
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
    http: httpx.Client,
    base_url: str,
    model: str,
    jobs: list,
    phases: Phases,
    sampler: Sampler,
) -> dict[str, Any]:
    """Saturation, load, drain and the end checks; the report without RSS and shutdown."""
    if args.rate is None:
        phases("saturation")
        sat, _ = measure_saturation(args, pool, base_url, model, jobs)
        print(f"saturation: {sat['rate_rps']:.3f} req/s", flush=True)
        wait_drained(http, args.drain_timeout)
    else:
        sat = {"method": "given (--rate)", "rate_rps": args.rate}
    rate = args.load_factor * sat["rate_rps"]
    phases("load")
    print(f"load: {rate:.3f} req/s for {args.duration:g} s", flush=True)
    futures, start = start_load(args, pool, base_url, model, jobs, rate)
    time.sleep(max(0.0, start + args.duration - time.time()))
    phases("drain")  # the schedule is over: the last responses, then an idle engine
    outcomes = [o for f in futures for o in f.result(timeout=args.timeout + 60)]
    load = load_summary(outcomes, rate, start, args.duration)
    drained = wait_drained(http, args.drain_timeout)
    load["drain_s"] = drained[1]
    phases("checks")
    failed = {f"load {k}": n for k, n in load["failed_by_kind"].items()}
    failed.update({f"saturation {k}": n for k, n in sat.get("failed_by_kind", {}).items()})
    checks = {"no_failures": _check(not failed, f"{failed or 'none'}")}
    checks.update(end_checks(http, args, model, jobs, drained))
    checks["no_server_errors"] = server_error_check(sampler, drained[2])
    return {
        "ok": None,
        "saturation": sat,
        "load": load,
        "end_state": drained[2],
        "checks": checks,
        "client_series": client_series(outcomes, start),
        "_load_window": (start - sampler.t0, start - sampler.t0 + args.duration),
    }


def _jsonable(v: Any) -> Any:
    return "inf" if isinstance(v, float) and math.isinf(v) else v


if __name__ == "__main__":
    sys.exit(main())
