"""How many SSE chunks per second the API side of ``python -m graphrt.serve`` can send, measured
without a GPU.

Starts the real server with a mock engine core (``--mock-engine-step-ms``: no model; every
running request gets one token per step period, as from a GPU decoding at that pace), then opens
``--streams`` streaming completions at once and reads them with a lightweight client (raw
asyncio sockets: it counts SSE events and timestamps each read, without parsing JSON, so one
client process keeps up with far more events than an httpx client does). It reports, per round:

* **API CPU per chunk** (µs): CPU time of the API process(es) from ``/proc`` (every thread, the
  ZMQ I/O thread included) over SSE chunks sent, and the chunk rate one fully busy API process
  could sustain (1e6 / that);
* the **chunk rate** achieved and the API processes' load (cores);
* **ITL** as clients see it (gaps between a stream's chunks, pooled; median, p90, p99) beside
  the mock step period, **tokens per chunk** (1.0 when the API keeps up), and TTFT.

::

    # the H100 issue's load: 64 streams, one token each per 1.8 ms
    python benchmarks/api_capacity.py --streams 64 --step-ms 1.8 --output-len 2000 --repeats 5

    # server flags after `--`, e.g. several API processes
    python benchmarks/api_capacity.py --streams 64 --step-ms 1.8 -- --api-server-count 2

The client, the API process(es) and the mock engine share the machine: compare figures only
from the same machine and report its cores; ``client_cpu_s`` says what the client itself cost.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_USAGE = re.compile(rb'"completion_tokens":(\d+)')
ENGINE_PROCESS_NAME = "graphrt-engine"  # the engine core's /proc/PID/comm


# ---- client ----------------------------------------------------------------------------------
async def one_stream(host: str, port: int, body: bytes, api_key: str | None) -> dict[str, Any]:
    """One streaming completion over a fresh connection. Returns its TTFT, the times of its
    chunks (one timestamp per socket read, shared by the events that read delivered), and the
    completion tokens from the usage chunk."""
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{auth}"
        "Connection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        t0 = time.perf_counter()
        writer.write(head + body)
        status_line = await reader.readuntil(b"\r\n")
        await reader.readuntil(b"\r\n\r\n")
        status = int(status_line.split(b" ", 2)[1])
        if status != 200:
            return {"error": f"HTTP {status}: {(await reader.read(300))[:300]!r}"}
        times: list[float] = []
        counts: list[int] = []
        tail = b""
        window = b""
        done = False
        while not done:
            data = await reader.read(1 << 16)
            if not data:
                break
            t = time.perf_counter()
            s = tail + data  # an event split across reads is counted once, in the later read
            k = s.count(b"data: ")
            if k:
                times.append(t)
                counts.append(k)
            done = b"data: [DONE]" in s
            tail = s[-11:]
            window = (window + data)[-1024:]
    finally:
        writer.close()
    if not done:
        return {"error": "stream ended before [DONE]"}
    m = _USAGE.search(window)
    if m is None:
        return {"error": "no usage chunk"}
    # Every event but the last two (the usage chunk and [DONE]) carries tokens.
    events = [t for t, k in zip(times, counts) for _ in range(k)][:-2]
    if not events:
        return {"error": "no token chunks"}
    gaps = [b - a for a, b in itertools.pairwise(events)]
    return {
        "ttft": events[0] - t0,
        "e2e": events[-1] - t0,
        "gaps": gaps,
        "chunks": len(events),
        "tokens": int(m.group(1)),
    }


async def _drive(
    host: str, port: int, bodies: list[bytes], api_key: str | None, start_at: float
) -> tuple[list[dict[str, Any]], float, float, float]:
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    cpu0 = time.process_time()
    first = time.time()
    results = await asyncio.gather(*(one_stream(host, port, b, api_key) for b in bodies))
    return list(results), first, time.time(), time.process_time() - cpu0


def _worker(payload: tuple) -> tuple[list[dict[str, Any]], float, float, float]:
    return asyncio.run(_drive(*payload))


# ---- process CPU -----------------------------------------------------------------------------
def _proc_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, /proc/stat)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in f]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _CLK_TCK  # less idle and iowait


def cpu_by_role(server_pid: int) -> dict[str, float]:
    """CPU seconds so far: the engine core (by its process name) and everything else under the
    server's process (the API side: its process(es) and any supervisor)."""
    out = {"api": 0.0, "engine": 0.0}
    for pid in _proc_tree(server_pid):
        role = "engine" if _comm(pid) == ENGINE_PROCESS_NAME else "api"
        out[role] += _cpu_s(pid)
    return out


# ---- measurement -----------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_round(args: argparse.Namespace, server: Any, pool: Any) -> dict[str, Any]:
    body = json.dumps(
        {
            "prompt": list(range(1, args.input_len + 1)),
            "max_tokens": args.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()
    w = max(1, min(args.num_workers, args.streams))
    shares = [args.streams // w + (k < args.streams % w) for k in range(w)]
    start_at = time.time() + (1.0 if w > 1 else 0.0)
    parts = [(server.host, server.port, [body] * n, args.api_key, start_at) for n in shares]
    cpu0, busy0, t0 = cpu_by_role(server.proc.pid), machine_busy_s(), time.monotonic()
    if w == 1:
        outs = [_worker(parts[0])]
    else:
        outs = list(pool.map(_worker, parts))
    cpu1, busy1, t1 = cpu_by_role(server.proc.pid), machine_busy_s(), time.monotonic()
    results = [r for rs, _, _, _ in outs for r in rs]
    errors = sorted({r["error"] for r in results if "error" in r})
    ok = [r for r in results if "error" not in r]
    wall = max(end for _, _, end, _ in outs) - min(first for _, first, _, _ in outs)
    chunks = sum(r["chunks"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    api_cpu = cpu1["api"] - cpu0["api"]
    engine_cpu = cpu1["engine"] - cpu0["engine"]
    us_per_chunk = api_cpu / chunks * 1e6 if chunks else None
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "wall_s": wall,
        "chunks": chunks,
        "tokens": tokens,
        "tokens_per_chunk": tokens / chunks if chunks else None,
        "chunks_per_s": chunks / wall,
        "tokens_per_s": tokens / wall,
        "api_cpu_s": api_cpu,
        "api_cores": api_cpu / wall,
        "api_us_per_chunk": us_per_chunk,
        "api_us_per_token": api_cpu / tokens * 1e6 if tokens else None,
        "chunks_per_s_per_busy_api_process": 1e6 / us_per_chunk if us_per_chunk else None,
        "engine_cpu_s": engine_cpu,
        "engine_cores": engine_cpu / wall,
        "client_cpu_s": sum(c for _, _, _, c in outs),
        # Everything else the machine ran meanwhile (other users, the kernel): contention.
        "other_cores": ((busy1 - busy0) - api_cpu - engine_cpu - sum(c for _, _, _, c in outs))
        / (t1 - t0),
        "itl_ms": {
            "median": statistics.median(gaps) * 1e3 if gaps else None,
            "p90": _pct(gaps, 0.9) * 1e3 if gaps else None,
            "p99": _pct(gaps, 0.99) * 1e3 if gaps else None,
            "mean": statistics.fmean(gaps) * 1e3 if gaps else None,
        },
        "ttft_ms": {
            "median": statistics.median(r["ttft"] for r in ok) * 1e3 if ok else None,
            "max": max(r["ttft"] for r in ok) * 1e3 if ok else None,
        },
    }


def _spread(rounds: list[dict[str, Any]], key: str, sub: str | None = None) -> dict[str, Any]:
    vals = [r[key][sub] if sub else r[key] for r in rounds]
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


SUMMARY_KEYS = (
    ("api_us_per_chunk", None),
    ("chunks_per_s_per_busy_api_process", None),
    ("chunks_per_s", None),
    ("tokens_per_chunk", None),
    ("api_cores", None),
    ("engine_cores", None),
    ("other_cores", None),
    ("itl_ms", "median"),
    ("itl_ms", "p90"),
    ("itl_ms", "p99"),
    ("ttft_ms", "median"),
)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {(f"{k}.{s}" if s else k): _spread(rounds, k, s) for k, s in SUMMARY_KEYS}


def print_report(out: dict[str, Any]) -> None:
    cfg = out["config"]
    print(
        f"{cfg['streams']} streams, 1 token per {cfg['step_ms']} ms each "
        f"(offered {cfg['streams'] / cfg['step_ms'] * 1e3:,.0f} tokens/s), "
        f"{cfg['output_len']} tokens per request, {len(out['rounds'])} rounds, "
        f"server flags {cfg['server_args']}, {os.cpu_count()} CPUs"
    )
    for name, s in out["summary"].items():
        if s["median"] is None:
            continue
        print(f"  {name:<38} {s['median']:>12,.2f}   [{s['min']:,.2f} - {s['max']:,.2f}]")
    for r in out["rounds"]:
        for e in r["errors"]:
            print(f"error: {e}")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=64, help="concurrent streaming requests")
    p.add_argument("--step-ms", type=float, default=1.8, help="the mock engine's step period")
    p.add_argument("--output-len", type=int, default=2000, help="tokens per request")
    p.add_argument("--input-len", type=int, default=16, help="prompt tokens per request")
    p.add_argument("--repeats", type=int, default=5, help="rounds on the same server")
    p.add_argument("--num-workers", type=int, default=1, help="client processes")
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--model",
        default=str(ROOT / "benchmarks" / "models" / "llama-3.2-1b"),
        help="a model directory; the mock reads only its config.json (vocab, context)",
    )
    p.add_argument("--json", default=None, help="write every round and the summary here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1 :]
    args = make_parser().parse_args(argv)
    if args.streams < 1 or args.output_len < 2 or args.repeats < 1:
        raise SystemExit("--streams, --repeats must be >= 1 and --output-len >= 2")
    from graphrt.serve.launcher import ServerProcess

    flags = [
        "--model", args.model,
        "--mock-engine-step-ms", str(args.step_ms),
        "--max-num-seqs", str(args.streams),
        "--max-concurrent-requests", str(max(1024, 2 * args.streams)),
        "--log-level", "warning",
        *(["--api-key", args.api_key] if args.api_key else []),
        *server_args,
    ]  # fmt: skip
    rounds = []
    ctx = multiprocessing.get_context("spawn")
    with (
        ServerProcess(flags) as server,
        ProcessPoolExecutor(max(1, args.num_workers), mp_context=ctx) as pool,
    ):
        # Warm-up: one short request through every code path.
        warm = argparse.Namespace(**{**vars(args), "streams": 1, "output_len": 8, "num_workers": 1})
        run_round(warm, server, pool)
        for _ in range(args.repeats):
            rounds.append(run_round(args, server, pool))
    out = {
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("api_key", "json")},
            "server_args": server_args,
            "cpu_count": os.cpu_count(),
        },
        "rounds": rounds,
        "summary": summarize(rounds),
    }
    print_report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(r["failed"] == 0 for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
