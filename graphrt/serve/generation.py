"""``Generation``: one HTTP request's engine requests, from admission to abort-or-finish.

A completions request with several prompts becomes several engine requests (one per prompt;
the engine fans each out to ``n`` sequences). They share one output queue, tagged by prompt
index. :meth:`Generation.close` is the single exit: it aborts whatever has not finished (client
gone, error, server draining) so the engine frees its pages at once, and releases the request's
concurrency slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from graphrt.serve.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineRejected,
    OutputBox,
    QueueItem,
)
from graphrt.serve.errors import APIError
from graphrt.serve.ipc import RejectKind
from graphrt.serve.metrics import ServerMetrics


class GenerationFailed(Exception):
    """The engine failed a request mid-generation (step error, dead engine)."""


class Generation:
    """Engine requests ``{base_id}-{tag}`` for ``tag in range(num_prompts)``."""

    def __init__(
        self,
        client: EngineClient,
        metrics: ServerMetrics,
        base_id: str,
        num_prompts: int,
        arrival: float,
        on_close: Callable[[], None],
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.rids = [f"{base_id}-{i}" for i in range(num_prompts)]
        self.arrival = arrival
        self.queue = OutputBox()
        self._unfinished = set(range(num_prompts))
        self._first: list[float | None] = [None] * num_prompts
        self._last: list[float] = [arrival] * num_prompts
        self._on_close = on_close
        self._closed = False
        self.failed = False
        self.num_generated = 0

    async def start(
        self, prompts: list[list[int]], params: dict[str, Any], cache_salt: str | None = None
    ) -> None:
        """Hand every prompt to the engine and wait until it has accepted them all. Raises
        :class:`APIError` for a rejection (the other prompts are aborted by :meth:`close`)."""
        futures = []
        try:
            for tag, ids in enumerate(prompts):
                futures.append(
                    self.client.add(self.rids[tag], ids, params, self.queue, tag, cache_salt)
                )
        except EngineDeadError as e:
            raise APIError(
                503, f"engine unavailable: {e}", code="engine_unavailable", reason="engine_error"
            ) from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        results = await asyncio.gather(*futures, return_exceptions=True)
        for r in results:
            if isinstance(r, EngineRejected):
                if r.kind == RejectKind.OVERLOADED:
                    raise APIError(503, str(r), code="server_overloaded")
                if r.kind == RejectKind.INVALID:
                    raise APIError(400, str(r))
                raise APIError(500, f"engine could not add the request: {r}")
            if isinstance(r, EngineDeadError):
                raise APIError(
                    503,
                    f"engine unavailable: {r}",
                    code="engine_unavailable",
                    reason="engine_error",
                )
            if isinstance(r, BaseException):
                raise r
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))

    async def outputs(self) -> AsyncIterator[list[QueueItem]]:
        """Yield batches of outputs (all that have arrived since the last batch) until every
        engine request has finished. Raises :class:`GenerationFailed` on an engine error."""
        while self._unfinished:
            batch = await self.queue.get_all()
            now = time.monotonic()
            # Metrics once per batch, not per output: this loop runs per token.
            progressed: set[int] = set()
            num = 0
            for tag, out in batch:
                if out.error is not None:
                    self.failed = True
                    raise GenerationFailed(out.error)
                n = sum(len(c.token_ids) for c in out.choices)
                if n:
                    num += n
                    progressed.add(tag)
                if out.finished:
                    self._unfinished.discard(tag)
            if num:
                self._observe(progressed, num, now)
            yield batch

    def _observe(self, tags: set[int], num: int, now: float) -> None:
        m = self.metrics
        for tag in tags:
            if self._first[tag] is None:
                self._first[tag] = now
                m.ttft.observe(now - self.arrival)
            else:
                m.itl.observe(now - self._last[tag])
            self._last[tag] = now
        self.num_generated += num
        m.generation_tokens.inc(num)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def close(self) -> None:
        """Abort what has not finished and release the request's slot. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._unfinished:
            self.client.abort([self.rids[t] for t in sorted(self._unfinished)])
        elif self._first[0] is not None:
            self.metrics.e2e.observe(max(self._last) - self.arrival)
        self.metrics.flush()
        self._on_close()


async def wait_for_disconnect(receive: Callable[[], Any]) -> None:
    """Return when the client has gone away. Call only after the body has been read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
