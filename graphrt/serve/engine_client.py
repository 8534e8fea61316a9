"""``EngineClient``: an API process's handle on the engine-core process.

It binds its two ZMQ pipes in a private temporary directory, starts the engine core
(``multiprocessing`` "spawn") unless another process does, and runs one reader task that turns
each step's token ids into text (the text side,
:class:`~graphrt.output_processor.OutputProcessor`, with this process's tokenizer) and routes
the outputs to the output box of the HTTP request that owns them; completions it ends on a
stop string go back to the core to be ended there. It also watches the engine process: when it
exits, every pending request is failed at once (nothing waits forever) and
:meth:`health_problem` says why.

With several API processes (``--api-server-count``), :class:`EnginePipes` names one pipe pair
per process; the supervisor's client starts the engine core with all of them, and each API
process's client attaches to its own pair and watches the engine by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import zmq
import zmq.asyncio

from graphrt.config import EngineConfig
from graphrt.output_processor import OutputProcessor, completion_ids
from graphrt.request import FinishReason
from graphrt.sampling_params import SamplingParams
from graphrt.serve.engine_core import run_engine_core, serve_engine
from graphrt.serve.ipc import (
    Msg,
    OutputDelta,
    RejectKind,
    decode_tokens,
    delta_of,
    pack,
    unpack,
)
from graphrt.serve.mock_engine import MockTokenizer

logger = logging.getLogger(__name__)

# Longest path a Unix socket address may have (sun_path), less the "/outNN" suffix.
_MAX_SOCKET_DIR_LEN = 100
HEARTBEAT_S = 1.0


class EngineDeadError(RuntimeError):
    """The engine process has exited or failed; no request can be served."""


class EngineRejected(Exception):
    """The engine refused a request; ``kind`` is a :class:`RejectKind`."""

    def __init__(self, kind: RejectKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class EngineInfo:
    """What the engine core reports once its model has loaded."""

    model_dir: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    num_usable_pages: int
    page_size: int
    has_tokenizer: bool
    pid: int


@dataclass(frozen=True)
class EnginePipes:
    """The ipc addresses of ``count`` pipe pairs between API processes and the engine core, in
    one private directory: pair ``i`` is ``in{i}`` (to the core) and ``out{i}`` (back)."""

    directory: str
    count: int

    @classmethod
    def create(cls, count: int) -> EnginePipes:
        return cls(_private_socket_dir(), count)

    def in_addr(self, i: int) -> str:
        return f"ipc://{self.directory}/in{i}"

    def out_addr(self, i: int) -> str:
        return f"ipc://{self.directory}/out{i}"

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# An item in a request's output box: (tag chosen by the caller, the output).
QueueItem = tuple[int, OutputDelta]


class OutputBox:
    """Where the reader task drops one HTTP request's outputs, and where its handler waits for
    them: a list and at most one waiting future. This runs once per token per stream, so it does
    less than an ``asyncio.Queue`` (no per-item bookkeeping; one wake-up per batch)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[QueueItem] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: QueueItem) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get_all(self) -> list[QueueItem]:
        """Everything that has arrived since the last call, waiting for at least one item."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class EngineClient:
    """Starts (or attaches to), feeds, watches and stops the engine-core process.

    Use from a single asyncio event loop: :meth:`start`, then :meth:`add`/:meth:`abort` per
    request, :meth:`shutdown` at the end.
    """

    def __init__(
        self,
        engine_config: EngineConfig,
        *,
        heartbeat_timeout_s: float = 30.0,
        log_level: int = logging.INFO,
        in_thread: bool = False,
        mock_step_s: float | None = None,
        pipes: EnginePipes | None = None,
        index: int = 0,
        engine_pid: int | None = None,
    ) -> None:
        """``in_thread`` runs the engine loop on a thread of this process instead of its own
        process: the same messages over the same sockets, for measuring what the separate
        process buys (HTTP work then competes with the scheduler for the GIL). ``mock_step_s``
        runs a :class:`~graphrt.serve.mock_engine.MockEngine` (no model) that gives each running
        request one token per period, for measuring the API side alone.

        ``pipes`` and ``index``: this client's pipe pair among several. Without ``pipes`` the
        client makes (and removes) its own single pair. ``engine_pid`` *attaches* to an engine
        core that another process started (with the same ``pipes``): the client starts
        nothing, never stops the engine, and watches that pid to notice its exit."""
        self.engine_config = engine_config
        self.in_thread = in_thread
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.log_level = log_level
        self.mock_step_s = mock_step_s
        self.attached = engine_pid is not None
        self.engine_pid = engine_pid
        self.info: EngineInfo | None = None
        self.stats: dict[str, Any] = {}
        self._dead: str | None = None
        self._stopping = False
        self._closed = False
        self._sinks: dict[str, tuple[OutputBox, int]] = {}
        # The text side of this process's requests; its tokenizer comes with set_tokenizer.
        self._text = OutputProcessor(MockTokenizer() if mock_step_s is not None else None)
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._stats_waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._stats_seq = 0
        self._last_seen = time.monotonic()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._thread: threading.Thread | None = None
        self._pipes = pipes
        self._own_pipes = pipes is None
        self._index = index
        self._pidfd: int | None = None
        self._sctx: zmq.Context | None = None
        self._actx: zmq.asyncio.Context | None = None
        self._tx: zmq.Socket | None = None
        self._rx: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._ready: asyncio.Future[EngineInfo] | None = None
        self._exited: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self, timeout_s: float) -> EngineInfo:
        """Spawn the engine core (or attach to it) and wait until its model has loaded."""
        self.launch()
        return await self.wait_ready(timeout_s)

    def launch(self) -> int | None:
        """Bind this client's pipes and start the engine core, or, attached, watch it. Returns
        the engine process's pid (None when it runs in a thread). Call from the event loop."""
        self._loop = loop = asyncio.get_running_loop()
        if self._pipes is None:
            self._pipes = EnginePipes.create(1)
        pipes, i = self._pipes, self._index
        self._sctx = zmq.Context()
        self._tx = self._sctx.socket(zmq.PUSH)
        # Sends never block the event loop; the engine core drains its inbox every step.
        self._tx.setsockopt(zmq.SNDHWM, 0)
        self._tx.setsockopt(zmq.LINGER, 0)
        self._tx.bind(pipes.in_addr(i))
        self._actx = zmq.asyncio.Context()
        self._rx = self._actx.socket(zmq.PULL)
        self._rx.setsockopt(zmq.RCVHWM, 0)
        self._rx.setsockopt(zmq.LINGER, 0)
        self._rx.bind(pipes.out_addr(i))
        self._ready = loop.create_future()
        self._exited = asyncio.Event()
        self._reader = asyncio.create_task(self._read_loop(), name="graphrt-engine-reader")
        if self.attached:
            self._watch_pid(self.engine_pid)
            return self.engine_pid
        engine_kwargs = {
            f.name: getattr(self.engine_config, f.name) for f in fields(self.engine_config)
        }
        in_addrs = [pipes.in_addr(k) for k in range(pipes.count)]
        out_addrs = [pipes.out_addr(k) for k in range(pipes.count)]
        if self.in_thread:
            self._start_thread(engine_kwargs, in_addrs, out_addrs)
            return None
        ctx = multiprocessing.get_context("spawn")
        args = (engine_kwargs, in_addrs, out_addrs, HEARTBEAT_S, self.log_level, self.mock_step_s)
        self._proc = ctx.Process(
            target=run_engine_core,
            args=args,
            name="graphrt-engine-core",
            daemon=True,
        )
        self._proc.start()
        loop.add_reader(self._proc.sentinel, self._on_process_exit)
        self.engine_pid = self._proc.pid
        return self.engine_pid

    async def wait_ready(self, timeout_s: float) -> EngineInfo:
        """Wait until the engine core has loaded its model (after :meth:`launch`)."""
        try:
            self.info = await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except asyncio.TimeoutError:
            raise EngineDeadError(
                f"engine did not load its model within {timeout_s:.0f} s"
            ) from None
        self._last_seen = time.monotonic()
        logger.info(
            "engine core ready (pid %d): max_model_len=%d, %d KV pages",
            self.info.pid,
            self.info.max_model_len,
            self.info.num_usable_pages,
        )
        return self.info

    def _start_thread(
        self, engine_kwargs: dict[str, Any], in_addrs: list[str], out_addrs: list[str]
    ) -> None:
        loop = self._loop

        def target() -> None:
            code = 1
            try:
                code = serve_engine(
                    engine_kwargs, in_addrs, out_addrs, HEARTBEAT_S, None, self.mock_step_s
                )
            finally:
                loop.call_soon_threadsafe(self._on_worker_exit, code)

        self._thread = threading.Thread(target=target, name="graphrt-engine-core", daemon=True)
        self._thread.start()

    def _watch_pid(self, pid: int) -> None:
        """Notice the exit of an engine process that is not our child (Linux pidfd). Without
        pidfd, only the heartbeat tells: /health turns 503 after the heartbeat timeout."""
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError) as e:
            if isinstance(e, ProcessLookupError):
                self._on_worker_exit(None)
                return
            logger.warning("cannot watch the engine process (%s); relying on its heartbeat", e)
            return
        self._loop.add_reader(self._pidfd, self._on_pidfd_exit)

    def _on_pidfd_exit(self) -> None:
        self._close_pidfd()
        self._on_worker_exit(None)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine core (politely, then by force) and release every resource. Attached,
        only release this client's resources: the engine's owner stops it."""
        if self._closed:
            return
        proc = self._proc
        self._stopping = True
        if self._loop is not None:
            self._close_pidfd()
        if self._thread is not None and self._thread.is_alive():
            if self._dead is None:
                self._send_shutdown()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited.wait(), timeout_s)
        if proc is not None and proc.is_alive():
            if self._dead is None:
                self._send_shutdown()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited.wait(), timeout_s)
            if proc.is_alive():
                logger.warning("engine core did not stop in %.0f s; terminating it", timeout_s)
                proc.terminate()
                await asyncio.to_thread(proc.join, 5)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        self._mark_dead("server is shutting down")
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if proc is not None and self._loop is not None:
            self._loop.remove_reader(proc.sentinel)
        for sock in (self._tx, self._rx):
            if sock is not None:
                sock.close(linger=0)
        for ctx in (self._sctx, self._actx):
            if ctx is not None:
                ctx.term()
        if self._own_pipes and self._pipes is not None:
            self._pipes.remove()
            self._pipes = None
        self._closed = True

    def set_tokenizer(self, tokenizer: Any) -> None:
        """The tokenizer the text side detokenizes with (None: the model has none, so outputs
        carry ids only). The mock engine's words need no tokenizer."""
        if self.mock_step_s is None:
            self._text.tokenizer = tokenizer

    # ---- requests ---------------------------------------------------------------------------
    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        queue: OutputBox,
        tag: int = 0,
        cache_salt: str | None = None,
    ) -> asyncio.Future[None]:
        """Send a request to the engine. Its outputs will arrive in ``queue`` as
        ``(tag, OutputDelta)``. The returned future resolves when the engine has accepted it,
        and raises :class:`EngineRejected` or :class:`EngineDeadError` otherwise.

        Raises ``ValueError`` at once if the request cannot be encoded (e.g. a lone surrogate
        in a stop string).
        """
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            data = pack([Msg.ADD, request_id, prompt_ids, params, cache_salt])
            sampling = SamplingParams(**params)
        except (TypeError, ValueError, OverflowError, UnicodeError) as e:
            raise ValueError(f"request cannot be encoded: {e}") from e
        seq_ids = completion_ids(request_id, sampling.n)
        text = self._text
        text.register(text.new_group(request_id, seq_ids, None, prompt_ids, sampling, stream=True))
        fut = self._loop.create_future()
        self._acks[request_id] = fut
        self._sinks[request_id] = (queue, tag)
        self._tx.send(data, zmq.NOBLOCK)
        return fut

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests; no more outputs will be delivered for them."""
        for rid in request_ids:
            self._sinks.pop(rid, None)
            self._text.drop(rid)
            fut = self._acks.pop(rid, None)
            if fut is not None and not fut.done():
                fut.cancel()
        if request_ids and self._dead is None:
            self._send([Msg.ABORT, list(request_ids)])

    async def fetch_stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """Fresh engine stats: the reply reflects every message sent before this call. Falls back
        to the last stats received if the engine does not answer in time."""
        if self._dead is not None:
            return self.stats
        self._stats_seq += 1
        seq = self._stats_seq
        fut = self._loop.create_future()
        self._stats_waiters[seq] = fut
        self._send([Msg.STATS, seq])
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            return self.stats
        finally:
            self._stats_waiters.pop(seq, None)

    # ---- health -----------------------------------------------------------------------------
    @property
    def dead(self) -> str | None:
        """Why the engine can no longer serve, or None while it can."""
        return self._dead

    def health_problem(self) -> str | None:
        """None when the engine is alive and reporting, else what is wrong."""
        if self._dead is not None:
            return self._dead
        if self.info is None:
            return "engine is starting"
        silent = time.monotonic() - self._last_seen
        if silent > self.heartbeat_timeout_s:
            return f"engine has not reported for {silent:.0f} s (stuck?)"
        return None

    @property
    def num_pending(self) -> int:
        """Engine requests this client is still routing outputs for."""
        return len(self._sinks)

    # ---- internals --------------------------------------------------------------------------
    def _send(self, msg: list[Any]) -> None:
        self._tx.send(pack(msg), zmq.NOBLOCK)

    def _send_shutdown(self) -> None:
        try:
            self._send([Msg.SHUTDOWN])
        except zmq.Again:  # still loading, not connected yet: shutdown() ends it by force
            logger.info("the engine core is not connected yet; it will be stopped by force")

    async def _read_loop(self) -> None:
        while True:
            data = await self._rx.recv()
            self._last_seen = time.monotonic()
            try:
                self._dispatch(unpack(data))
            except Exception:
                logger.exception("bad message from the engine core")

    def _dispatch(self, msg: list[Any]) -> None:
        tag = msg[0]
        if tag == Msg.TOKENS:
            outs, ended = self._text.process(decode_tokens(msg))
            if ended and self._dead is None:
                # A stop string (or a text error) ended these: the core stops sampling them.
                stop = FinishReason.STOP
                ends = [[q.request_id, (q.finish_reason or stop).value, q.error] for q in ended]
                self._send([Msg.END, ends])
            sinks = self._sinks
            for out in outs:
                sink = sinks.get(out.request_id)
                if sink is None:  # aborted; the engine stopped it already
                    continue
                if out.finished:
                    del sinks[out.request_id]
                sink[0].put_nowait((sink[1], delta_of(out)))
        elif tag == Msg.ACKS:
            for rid, reject in msg[1]:
                fut = self._acks.pop(rid, None)
                if reject is not None:
                    self._sinks.pop(rid, None)
                    self._text.drop(rid)
                if fut is None or fut.done():
                    continue
                if reject is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(EngineRejected(RejectKind(reject[0]), reject[1]))
        elif tag == Msg.STATS_REPLY:
            seq, self.stats = msg[1], msg[2]
            if seq is not None:
                for s in [s for s in self._stats_waiters if s <= seq]:
                    fut = self._stats_waiters.pop(s)
                    if not fut.done():
                        fut.set_result(self.stats)
        elif tag == Msg.READY:
            if not self._ready.done():
                self._ready.set_result(EngineInfo(**msg[1]))
        elif tag == Msg.FATAL:
            logger.error("engine core: %s", msg[1])
            self._mark_dead(msg[1])
        else:
            logger.error("unknown message tag %r from the engine core", tag)

    def _on_process_exit(self) -> None:
        self._loop.remove_reader(self._proc.sentinel)
        code = self._proc.exitcode
        if code is None:
            self._proc.join(0.1)
            code = self._proc.exitcode
        self._on_worker_exit(code)

    def _on_worker_exit(self, code: int | None) -> None:
        """``code`` is None when the engine is not our child (its status is its parent's)."""
        self._exited.set()
        how = "" if code is None else f" (exit code {code})"
        if self._dead is None and not self._stopping:
            logger.error("engine core exited unexpectedly%s", how)
        self._mark_dead(f"engine process exited{how}")

    def _mark_dead(self, reason: str) -> None:
        """Fail everything pending; later requests are refused with ``reason``."""
        if self._dead is None:
            self._dead = reason
        err = EngineDeadError(self._dead)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(err)
        self._acks.clear()
        for rid, (queue, tag) in self._sinks.items():
            queue.put_nowait((tag, OutputDelta(rid, True, f"engine failed: {self._dead}", [])))
            self._text.drop(rid)
        self._sinks.clear()
        for fut in self._stats_waiters.values():
            if not fut.done():
                fut.set_result(self.stats)


def _private_socket_dir() -> str:
    """A fresh 0700 directory for the ipc sockets, short enough for a Unix socket path."""
    d = tempfile.mkdtemp(prefix="graphrt-")
    if len(d) > _MAX_SOCKET_DIR_LEN:
        os.rmdir(d)
        d = tempfile.mkdtemp(prefix="graphrt-", dir="/tmp")
    return d
