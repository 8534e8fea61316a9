"""Prometheus metrics of one server, in their own registry (so several apps, e.g. in tests, never
share counters).

With several API processes (``--api-server-count``) each process records its own requests, and
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before
the API processes start) merges them on every scrape, whichever process answers: counters and
histograms (TTFT, ITL, E2E) are summed over the processes, requests in flight are summed over
the live ones, and the engine gauges come from the engine's stats as fetched by the process
answering the scrape (and are left out while the engine is not healthy: see ``EngineGauges``).
"""

from __future__ import annotations

import bisect
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

# Labels of graphrt_request_failure_total.
FAILURE_REASONS = (
    "invalid_request",  # 400: malformed, wrong types, out of range, too long for the context
    "unauthorized",  # 401
    "not_found",  # 404: unknown model or route
    "too_large",  # 413: body over max_request_body_bytes
    "overloaded",  # 503: engine queue full or max_concurrent_requests reached
    "client_disconnect",  # the client went away; the request was aborted
    "engine_error",  # the request failed in the engine, or the engine is dead
    "internal_error",  # a server bug (500)
)


class ServerMetrics:
    """Every metric the server exports. Engine-side gauges are refreshed from the engine's
    stats just before each scrape."""

    def __init__(self, model_name: str, api_server: int = 0, multiprocess: bool = False) -> None:
        """``multiprocess``: one of several API processes; needs ``PROMETHEUS_MULTIPROC_DIR`` set
        before prometheus_client was first imported."""
        if multiprocess and not os.environ.get(MULTIPROC_DIR_ENV):
            raise RuntimeError(f"multiprocess metrics need {MULTIPROC_DIR_ENV}")
        self.multiprocess = multiprocess
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self._model = model_name
        self.engine = EngineGauges(model_name)
        r.register(self.engine)
        self.in_flight = Gauge(
            "graphrt_api_requests_in_flight", "Generation requests the API is serving now",
            labels, registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.api_server_requests = Counter(
            "graphrt_api_server_requests", "Generation requests admitted, by API process",
            [*labels, "api_server"], registry=r,
        ).labels(model_name, str(api_server))  # fmt: skip
        self.ttft = Histogram(
            "graphrt_time_to_first_token_seconds", "Request arrival to first generated token",
            labels, buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "graphrt_inter_token_latency_seconds", "Time between a request's successive outputs",
            labels, buckets=_ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "graphrt_e2e_request_latency_seconds", "Request arrival to its last token",
            labels, buckets=_E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "graphrt_prompt_tokens", "Prompt tokens of accepted requests", labels, registry=r
        )
        self.generation_tokens = Counter(
            "graphrt_generation_tokens", "Tokens generated", labels, registry=r
        )
        self.success = Counter(
            "graphrt_request_success", "Requests completed, by finish reason",
            [*labels, "finished_reason"], registry=r,
        )  # fmt: skip
        self.failure = Counter(
            "graphrt_request_failure", "Requests that failed, by reason",
            [*labels, "reason"], registry=r,
        )  # fmt: skip
        for reason in FAILURE_REASONS:  # export zeros, so rates work from the first scrape
            self.failure.labels(model_name, reason)
        for reason in ("stop", "length"):
            self.success.labels(model_name, reason)

        # Bind the single-label metrics once; labels() is a dict lookup under a lock.
        for attr in (
            "in_flight", "ttft", "itl", "e2e", "prompt_tokens", "generation_tokens",
        ):  # fmt: skip
            setattr(self, attr, getattr(self, attr).labels(model_name))
        # Observed once per stream chunk: counted locally, added to the metrics in bulk by
        # flush() (a prometheus observe costs microseconds, an mmap'd one in multiprocess mode
        # several more).
        self.ttft = _BufferedHistogram(self.ttft, _TTFT_BUCKETS)
        self.itl = _BufferedHistogram(self.itl, _ITL_BUCKETS)
        self.generation_tokens = _BufferedCounter(self.generation_tokens)

    def flush(self) -> None:
        """Add what the per-chunk metrics buffered to the exported ones. Called before each
        render, when a request ends, and periodically by the app."""
        self.ttft.flush()
        self.itl.flush()
        self.generation_tokens.flush()

    def update_engine(self, stats: dict[str, Any], healthy: bool) -> None:
        """The engine's stats as just fetched, and whether it is alive and reporting."""
        self.engine.update(stats, healthy)

    def fail(self, reason: str) -> None:
        self.failure.labels(self._model, reason).inc()

    def succeed(self, finish_reason: str) -> None:
        self.success.labels(self._model, finish_reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; merged over all API processes in
        multiprocess mode."""
        self.flush()
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        merged.register(self.engine)  # this process's fresh view; not kept in the shared files
        return generate_latest(merged), CONTENT_TYPE_LATEST


class EngineGauges:
    """The engine's state as gauges (a custom collector): from the stats that the process
    answering the scrape fetched just before it, plus ``graphrt_engine_healthy``.

    While the engine is not known healthy (starting, stuck past its heartbeat timeout, or
    dead), the state gauges have no sample at all (their HELP and TYPE stay); only
    ``graphrt_engine_healthy 0`` is exported. A dead engine's last stats describe nothing:
    exported, they would read "0 running, all KV pages free" exactly when nothing can run. Why
    absent rather than NaN: it is Prometheus' guidance for an exporter whose target is down (an
    ``up``-style gauge at 0 and no target metrics, as mysqld_exporter's ``mysql_up``), and what
    vLLM users see, since vLLM's server exits when its engine dies and its series go stale.
    Prometheus marks a series that leaves a scrape stale, so queries stop returning the old
    value at once and ``absent()`` can alert. NaN would keep the series, turn every aggregation
    over replicas (``sum`` of running requests) into NaN, and is not valid JSON for clients that
    record scrapes.

    Nothing here goes into prometheus-client's multiprocess files, so with several API
    processes a scrape reports the answering process's own fresh view.
    """

    # (metric, help, key in the engine core's stats)
    STATE = (
        ("graphrt_num_requests_running", "Sequences running in the engine", "running"),
        ("graphrt_num_requests_waiting", "Sequences waiting in the engine", "waiting"),
        ("graphrt_kv_cache_usage_perc", "Fraction of usable KV pages in use", "kv_usage"),
        (
            "graphrt_kv_cache_free_pages",
            "KV pages the allocator can hand out (free, or cached and evictable)",
            "free_pages",
        ),
        (
            "graphrt_kv_cache_cached_pages",
            "KV pages no request holds that keep a cached prefix (evicted when needed)",
            "cached_pages",
        ),
        ("graphrt_kv_cache_usable_pages", "KV pages requests can use", "usable_pages"),
        ("graphrt_free_slots", "Request slots free in the allocator", "free_slots"),
        ("graphrt_usable_slots", "Request slots (one per running sequence)", "usable_slots"),
        ("graphrt_num_preemptions", "Preemptions since the engine started", "preemptions"),
        ("graphrt_engine_steps", "Steps the engine has run since it started", "steps"),
    )
    # Counters since the engine started, in tokens, as vLLM's prefix_cache_queries and _hits.
    COUNTERS = (
        (
            "graphrt_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache at admission",
            "prefix_cache_queries",
        ),
        (
            "graphrt_prefix_cache_hits",
            "Prompt tokens whose KV the prefix cache held",
            "prefix_cache_hits",
        ),
    )
    HEALTHY = ("graphrt_engine_healthy", "1 while the engine process is alive and reporting")

    def __init__(self, model_name: str) -> None:
        self._model = model_name
        self._stats: dict[str, Any] = {}
        self._healthy = False

    def update(self, stats: dict[str, Any], healthy: bool) -> None:
        self._stats, self._healthy = dict(stats or {}), healthy

    def describe(self) -> list[Metric]:
        return [*self._state({}), GaugeMetricFamily(*self.HEALTHY, labels=["model_name"])]

    def collect(self) -> list[Metric]:
        health = GaugeMetricFamily(*self.HEALTHY, labels=["model_name"])
        health.add_metric([self._model], 1 if self._healthy else 0)
        return [*self._state(self._stats if self._healthy else {}), health]

    def _state(self, stats: dict[str, Any]) -> list[Metric]:
        out: list[Metric] = []
        for family, specs in (
            (GaugeMetricFamily, self.STATE),
            (CounterMetricFamily, self.COUNTERS),
        ):
            for name, doc, key in specs:
                m = family(name, doc, labels=["model_name"])
                if key in stats:
                    m.add_metric([self._model], stats[key])
                out.append(m)
        return out


class _BufferedCounter:
    __slots__ = ("_counter", "_pending")

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self._pending = 0.0

    def inc(self, amount: float = 1) -> None:
        self._pending += amount

    def flush(self) -> None:
        if self._pending:
            self._counter.inc(self._pending)
            self._pending = 0.0


class _BufferedHistogram:
    """One labelled prometheus histogram's observations, counted per bucket here and added in
    bulk. Falls back to one ``observe`` per value if the histogram's internals (per-bucket
    values and the sum, prometheus-client's layout since its first releases) differ."""

    __slots__ = ("_bounds", "_bulk", "_counts", "_hist", "_n", "_sum", "_values")

    def __init__(self, hist: Any, buckets: tuple[float, ...]) -> None:
        self._hist = hist
        self._bounds = [*buckets, float("inf")]
        self._bulk = len(getattr(hist, "_buckets", ())) == len(self._bounds) and hasattr(
            hist, "_sum"
        )
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._n = 0
        self._values: list[float] = []

    def observe(self, value: float) -> None:
        if self._bulk:
            self._counts[bisect.bisect_left(self._bounds, value)] += 1
            self._sum += value
            self._n += 1
        else:
            self._values.append(value)

    def flush(self) -> None:
        if self._values:
            values, self._values = self._values, []
            for v in values:
                self._hist.observe(v)
        if not self._n:
            return
        for i, k in enumerate(self._counts):
            if k:
                self._hist._buckets[i].inc(k)
                self._counts[i] = 0
        self._hist._sum.inc(self._sum)
        self._sum = 0.0
        self._n = 0
