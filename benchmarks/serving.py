"""Serving load benchmark, in the style of ``vllm bench serve``.

Sends seeded synthetic requests to a graphrt (or any OpenAI-compatible) server with Poisson or
gamma arrivals and an optional concurrency cap, streams every response, and reports TTFT, TPOT,
ITL and E2E (mean, median, p99, in ms) plus request and token throughput::

    # start a server, run, stop it
    python benchmarks/serving.py --num-prompts 200 --request-rate 8 --input-len 256 \\
        --output-len 128 --json out.json --launch-server -- --max-num-seqs 64

    # or target a running one (loopback only)
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --max-concurrency 64

Definitions (as in vLLM and SGLang): TTFT is send to first streamed token; TPOT per request is
(E2E - TTFT) / (output tokens - 1); ITL is the gaps between a request's successive chunks, pooled
over all requests; output tokens come from the server's usage report.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import multiprocessing
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Short common words; prompts of random words are for servers that only take text.
_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea"
)


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""
    status: int | None = None  # HTTP status; None if no response came
    code: str | None = None  # the OpenAI error body's "code" (e.g. "server_overloaded")


@dataclass
class Job:
    prompt: str | list[int]
    output_len: int


def make_jobs(args: argparse.Namespace) -> list[Job]:
    """Seeded synthetic prompts and output lengths, uniform in len * [1 - r, 1 + r]."""
    rng = random.Random(args.seed)
    words = _WORD_TEXT.split()

    def length(base: int) -> int:
        lo = max(1, int(base * (1 - args.range_ratio)))
        hi = max(lo, int(base * (1 + args.range_ratio)))
        return rng.randint(lo, hi)

    jobs = []
    for _ in range(args.num_prompts):
        n_in = length(args.input_len)
        if args.prompt_kind == "token-ids":
            prompt: str | list[int] = [
                rng.randrange(args.token_id_min, args.token_id_max) for _ in range(n_in)
            ]
        else:
            prompt = " ".join(rng.choice(words) for _ in range(n_in))
        jobs.append(Job(prompt, length(args.output_len)))
    return jobs


def arrival_gaps(args: argparse.Namespace, n: int) -> list[float]:
    """Gaps between request sends: gamma with shape ``burstiness`` (1.0 is Poisson) and mean
    1 / rate; all zero for an infinite rate."""
    if args.request_rate == float("inf"):
        return [0.0] * n
    rng = random.Random(args.seed + 1)
    theta = 1.0 / (args.request_rate * args.burstiness)
    return [rng.gammavariate(args.burstiness, theta) for _ in range(n)]


def request_body(args: argparse.Namespace, model: str, job: Job) -> tuple[str, dict[str, Any]]:
    common: dict[str, Any] = {
        "model": model,
        "max_tokens": job.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": args.ignore_eos,
    }
    if args.endpoint == "chat":
        if not isinstance(job.prompt, str):
            raise SystemExit("--endpoint chat needs --prompt-kind words")
        return "/v1/chat/completions", {
            **common,
            "messages": [{"role": "user", "content": job.prompt}],
        }
    return "/v1/completions", {**common, "prompt": job.prompt}


async def one_request(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], timeout: float
) -> Result:
    start = time.perf_counter()
    last = start
    first: float | None = None
    itl: list[float] = []
    usage: dict[str, int] | None = None
    try:
        async with client.stream("POST", path, json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                return Result(
                    False,
                    error=f"HTTP {resp.status_code}: {raw[:200]}",
                    status=resp.status_code,
                    code=_error_code(raw),
                )
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, error=str(chunk["error"].get("message")), status=200)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
    except (httpx.HTTPError, OSError, ValueError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    if first is None or usage is None:
        return Result(False, error="stream ended without tokens or usage", status=200)
    return Result(
        True,
        status=200,
        ttft=first - start,
        e2e=last - start,
        itl=itl,
        output_tokens=usage["completion_tokens"],
        prompt_tokens=usage["prompt_tokens"],
    )


def _error_code(raw: bytes) -> str | None:
    """The "code" of an OpenAI-style error body, if it is one."""
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return err.get("code") if isinstance(err, dict) else None


def http_client(base_url: str, api_key: str | None) -> httpx.AsyncClient:
    """An HTTP client for the server under test, without connection limits (load_test shares it)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits)


async def prepare(args: argparse.Namespace, base_url: str) -> str:
    """The model name to send; also runs the warm-up requests."""
    async with http_client(base_url, args.api_key) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        for job in make_jobs(args)[: args.warmup]:
            path, body = request_body(args, model, Job(job.prompt, min(job.output_len, 8)))
            warm = await one_request(client, path, body, args.timeout)
            if not warm.ok:
                raise SystemExit(f"warm-up request failed: {warm.error}")
    return model


async def drive(
    args: argparse.Namespace,
    base_url: str,
    model: str,
    jobs: list[Job],
    send_at: list[float],
    cap: int | None,
    start_at: float,
) -> tuple[list[Result], float, float]:
    """Send ``jobs[i]`` at wall time ``start_at + send_at[i]`` with at most ``cap`` in flight.
    Returns the results and the wall times of the first send and of the last end."""
    gate = asyncio.Semaphore(cap) if cap else None
    async with http_client(base_url, args.api_key) as client:

        async def limited(job: Job) -> Result:
            path, body = request_body(args, model, job)
            if gate is None:
                return await one_request(client, path, body, args.timeout)
            async with gate:
                return await one_request(client, path, body, args.timeout)

        tasks = []
        first = time.time()
        for i, (job, at) in enumerate(zip(jobs, send_at)):
            delay = start_at + at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if i == 0:
                first = time.time()
            tasks.append(asyncio.create_task(limited(job)))
        results = await asyncio.gather(*tasks)
    return list(results), first, time.time()


def _worker(payload: tuple) -> tuple[list[Result], float, float]:
    return asyncio.run(drive(*payload))


def run_load(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    """Run the whole load, split over ``--num-workers`` client processes when asked: one Python
    process parses about 10-20k SSE events/s, less than a fast server sends."""
    model = asyncio.run(prepare(args, base_url))
    jobs = make_jobs(args)
    send_at = list(itertools.accumulate(arrival_gaps(args, len(jobs))))
    w = max(1, min(args.num_workers, len(jobs)))
    caps: list[int | None] = [None] * w
    if args.max_concurrency:
        caps = [args.max_concurrency // w + (k < args.max_concurrency % w) for k in range(w)]
    # Client workers import only httpx (not graphrt, whose import pulls in torch): two seconds
    # is plenty for them to start before the first send.
    start_at = time.time() + (2.0 if w > 1 else 0.0)
    parts = [
        (args, base_url, model, jobs[k::w], send_at[k::w], caps[k], start_at) for k in range(w)
    ]
    if w == 1:
        outs = [_worker(parts[0])]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(w, mp_context=ctx) as pool:
            outs = list(pool.map(_worker, parts))
    results = [r for rs, _, _ in outs for r in rs]
    duration = max(end for _, _, end in outs) - min(first for _, first, _ in outs)
    return summarize(args, model, results, duration)


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "mean": statistics.fmean(values) * scale,
        "median": statistics.median(values) * scale,
        "p99": p99 * scale,
    }


def _jsonable(v: Any) -> Any:
    return "inf" if isinstance(v, float) and math.isinf(v) else v


def summarize(
    args: argparse.Namespace, model: str, results: list[Result], duration: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "model": model,
        "config": {
            k: _jsonable(getattr(args, k))
            for k in (
                "endpoint",
                "num_prompts",
                "request_rate",
                "burstiness",
                "max_concurrency",
                "num_workers",
                "input_len",
                "output_len",
                "range_ratio",
                "prompt_kind",
                "seed",
                "ignore_eos",
                "temperature",
            )
        },
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors[:10],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([g for r in ok for g in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
    }


def print_report(s: dict[str, Any]) -> None:
    print(f"{'model':<28}{s['model']}")
    print(f"{'completed / failed':<28}{s['completed']} / {s['failed']}")
    print(f"{'duration (s)':<28}{s['duration_s']:.2f}")
    print(f"{'request throughput (req/s)':<28}{s['request_throughput']:.2f}")
    print(f"{'output throughput (tok/s)':<28}{s['output_throughput']:.1f}")
    print(f"{'total throughput (tok/s)':<28}{s['total_token_throughput']:.1f}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        v = s[key]
        if v["mean"] is None:
            continue
        print(
            f"{key[:-3].upper() + ' (ms)':<28}mean {v['mean']:.2f}  median {v['median']:.2f}"
            f"  p99 {v['p99']:.2f}"
        )
    for e in s["errors"]:
        print(f"error: {e}")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="loopback only")
    p.add_argument(
        "--launch-server",
        action="store_true",
        help="start `python -m graphrt.serve` with the arguments after `--`",
    )
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at once"
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrivals: 1 is Poisson, <1 burstier",
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="client processes sharing the load (and the concurrency cap); use several when "
        "one cannot keep up with the server's chunk rate",
    )
    add_workload_args(p, input_len=128, range_ratio=0.0)
    p.add_argument("--warmup", type=int, default=1, help="requests sent before measuring")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--json", default=None, help="write the results here ('-' for stdout)")
    return p


def add_workload_args(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, *, input_len: int, range_ratio: float
) -> None:
    """The seeded synthetic workload's flags (``request_body`` and the job generator read
    them); ``load_test.py`` shares them with its own defaults."""
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--input-len", type=int, default=input_len)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--range-ratio",
        type=float,
        default=range_ratio,
        help="lengths uniform in len * [1 - r, 1 + r]",
    )
    p.add_argument("--prompt-kind", choices=["token-ids", "words"], default="token-ids")
    p.add_argument("--token-id-min", type=int, default=1000)
    p.add_argument("--token-id-max", type=int, default=9000, help="exclusive")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--seed", type=int, default=0)


def split_server_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """The command line split at ``--``: this script's arguments, then the server's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def main(argv: list[str] | None = None) -> None:
    argv, server_args = split_server_args(argv)
    args = make_parser().parse_args(argv)
    if args.burstiness <= 0 or args.request_rate <= 0:
        raise SystemExit("--request-rate and --burstiness must be > 0")
    from graphrt.serve.launcher import ServerProcess, is_loopback

    server = None
    if args.launch_server:
        if args.api_key:
            server_args = ["--api-key", args.api_key, *server_args]
        server = ServerProcess(server_args).start(timeout=1800)
        base_url = server.base_url
    else:
        host = urlparse(args.base_url).hostname or ""
        if not is_loopback(host):
            raise SystemExit(f"--base-url must be a loopback address, not {host!r}")
        base_url = args.base_url.rstrip("/")
    try:
        summary = run_load(args, base_url)
    finally:
        if server is not None:
            server.stop()
    print_report(summary)
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
