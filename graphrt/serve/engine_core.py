"""The engine-core process: runs the :class:`~graphrt.engine.Engine` and its step loop, nothing
else.

The API process (HTTP, JSON, tokenization, detokenization, stop strings, SSE) lives elsewhere
so none of that work competes with the scheduler for the GIL. Between steps the loop drains its
inboxes (adds, aborts, completions the text side ended, stats queries) without blocking, then
runs the engine core's half of a step (``Engine.core_step``, token ids only) and ships the
step's ids as one message per API process. When there is nothing to run it blocks on the
inboxes, waking every ``heartbeat_s`` to send stats, which the API processes treat as a
heartbeat (see :mod:`graphrt.serve.ipc` for the messages).

Several API processes (``--api-server-count``) may share one engine core: each has its own pair
of pipes, and the core routes each request's acks and outputs back through the pair its ADD
came in on. Pair 0 belongs to the process that started the core, which alone sends SHUTDOWN.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import zmq

from graphrt.errors import EngineOverloaded, RequestRejected
from graphrt.output_processor import CoreFinish, StepTokens
from graphrt.request import FinishReason
from graphrt.sampling_params import SamplingParams
from graphrt.serve.ipc import Msg, RejectKind, encode_tokens, pack, unpack

if TYPE_CHECKING:
    from graphrt.engine import Engine

logger = logging.getLogger(__name__)

# The engine core's name in ps, top and /proc/PID/comm (at most 15 bytes).
ENGINE_PROCESS_NAME = "graphrt-engine"


def set_process_name(name: str) -> None:
    """Name this process for ps/top (Linux ``prctl(PR_SET_NAME)``); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


def run_engine_core(
    engine_kwargs: dict[str, Any],
    in_addrs: list[str],
    out_addrs: list[str],
    heartbeat_s: float,
    log_level: int,
    mock_step_s: float | None = None,
) -> None:
    """Process entry point (a ``multiprocessing`` "spawn" target). Exits with status 0 after a
    SHUTDOWN message, 1 after a fatal error, 2 when the process that started it has gone."""
    # The API process owns the lifecycle: a Ctrl-C or SIGTERM sent to the whole process group
    # must not kill the engine before the API process has drained its requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_process_name(ENGINE_PROCESS_NAME)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s [engine-core] %(name)s: %(message)s"
    )
    sys.exit(
        serve_engine(engine_kwargs, in_addrs, out_addrs, heartbeat_s, os.getppid(), mock_step_s)
    )


def serve_engine(
    engine_kwargs: dict[str, Any],
    in_addrs: list[str],
    out_addrs: list[str],
    heartbeat_s: float,
    parent_pid: int | None,
    mock_step_s: float | None = None,
) -> int:
    """Load the engine, announce it to every API process (one pipe pair each: ``in_addrs[i]``,
    ``out_addrs[i]``), and run the step loop until SHUTDOWN. Returns the exit status.
    ``parent_pid`` enables the orphan check (None when run in a thread).
    ``mock_step_s`` replaces the engine by a :class:`~graphrt.serve.mock_engine.MockEngine`
    stepping at that period (benchmarks of the API side)."""
    ctx = zmq.Context()
    inboxes, outboxes = [], []
    for in_addr, out_addr in zip(in_addrs, out_addrs, strict=True):
        inbox = ctx.socket(zmq.PULL)
        inbox.connect(in_addr)
        inboxes.append(inbox)
        outbox = ctx.socket(zmq.PUSH)
        # Unbounded: a slow API process must never block a step; the orphan check ends us if
        # the process that started us has gone away for good.
        outbox.setsockopt(zmq.SNDHWM, 0)
        outbox.connect(out_addr)
        outboxes.append(outbox)

    def broadcast(msg: list[Any]) -> None:
        data = pack(msg)
        for outbox in outboxes:
            outbox.send(data)

    try:
        try:
            if mock_step_s is not None:
                from graphrt.serve.mock_engine import MockEngine

                engine = MockEngine(mock_step_s, **engine_kwargs)
            else:
                # Here, not at module level: API processes import this module (to name the
                # spawn target) and must not load torch.
                from graphrt.engine import Engine

                # The API processes run the text side: the core needs no thread for it.
                kwargs = {**engine_kwargs, "text_thread": False}
                engine = Engine(show_progress=sys.stderr.isatty(), **kwargs)
        except BaseException as e:
            logger.exception("engine failed to start")
            broadcast([Msg.FATAL, f"engine failed to start: {type(e).__name__}: {e}"])
            return 1
        if parent_pid is not None:  # own process: the model and its state live until exit
            gc.collect()
            gc.freeze()
        try:
            broadcast([Msg.READY, _engine_info(engine)])
            return EngineCore(engine, inboxes, outboxes, heartbeat_s, parent_pid).run()
        finally:
            engine.shutdown()
    finally:
        # Give a last FATAL message a moment to leave before the sockets go.
        for inbox in inboxes:
            inbox.close(linger=0)
        for outbox in outboxes:
            outbox.close(linger=2000)
        ctx.term()


def _engine_info(engine: Engine) -> dict[str, Any]:
    tok = engine.tokenizer
    return {
        "model_dir": str(engine.model_dir),
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.model_config.vocab_size,
        "max_logprobs": engine.config.max_logprobs,
        "num_usable_pages": engine.pages.num_usable,
        "page_size": engine.pages.page_size,
        "has_tokenizer": tok is not None,
        "pid": os.getpid(),
    }


class EngineCore:
    """The step loop: inboxes, step, outboxes, repeat."""

    def __init__(
        self,
        engine: Engine,
        inboxes: list[zmq.Socket],
        outboxes: list[zmq.Socket],
        heartbeat_s: float,
        parent_pid: int | None,
    ) -> None:
        self.engine = engine
        self.inboxes = inboxes
        self.outboxes = outboxes
        self.heartbeat_s = heartbeat_s
        self.parent_pid = parent_pid
        self._stop = False
        # The engine plans one step ahead; after the last request finishes, one more step
        # consumes the step still in flight.
        self._flush_pending = False
        # Each unfinished request: the API process (pipe pair) it came from and its
        # completions the core has not ended yet; and each such completion's route.
        self._requests: dict[str, tuple[int, set[str]]] = {}
        self._seq_owner: dict[str, tuple[int, str]] = {}  # completion id -> (owner, request)
        self._last_sent = [0.0] * len(outboxes)

    def run(self) -> int:
        poller = zmq.Poller()
        for inbox in self.inboxes:
            poller.register(inbox, zmq.POLLIN)
        index = {inbox: i for i, inbox in enumerate(self.inboxes)}
        while True:
            busy = self.engine.has_unfinished() or self._flush_pending
            timeout_ms = 0 if busy else int(self.heartbeat_s * 1000)
            for sock, _ in poller.poll(timeout_ms):
                self._drain_inbox(index[sock])
            if self._stop:
                return 0
            if busy or self.engine.has_unfinished():
                try:
                    self._step()
                except Exception as e:
                    # Engine state can no longer be trusted: report, and let the API processes
                    # fail what is in flight and mark themselves unhealthy.
                    logger.exception("engine step failed")
                    for i in range(len(self.outboxes)):
                        self._send(i, [Msg.FATAL, f"engine step failed: {type(e).__name__}: {e}"])
                    return 1
            elif self.parent_pid is not None and os.getppid() != self.parent_pid:
                logger.error("the process that started the engine core is gone; exiting")
                return 2
            now = time.monotonic()
            stale = [i for i, t in enumerate(self._last_sent) if now - t >= self.heartbeat_s]
            if stale:
                stats = self._stats()
                for i in stale:
                    self._send(i, [Msg.STATS_REPLY, None, stats])

    def _step(self) -> None:
        tokens = self.engine.core_step()
        self._flush_pending = self.engine.has_unfinished()
        if not tokens:
            return
        if len(self.outboxes) == 1:
            self._send(0, encode_tokens(tokens))
        else:
            self._send_split(tokens)
        for sid in tokens.finished:
            self._ended(sid)

    def _send_split(self, tokens: StepTokens) -> None:
        """One message per API process, holding only its own requests' rows."""
        route = self._seq_owner
        rows: dict[int, list[int]] = {}
        for r, sid in enumerate(tokens.seq_ids):
            if (o := route.get(sid)) is not None:
                rows.setdefault(o[0], []).append(r)
        finished: dict[int, dict[str, CoreFinish]] = {}
        for sid, f in tokens.finished.items():
            if (o := route.get(sid)) is not None:
                finished.setdefault(o[0], {})[sid] = f
        cached: dict[int, dict[str, int | None]] = {}
        for rid, num in tokens.cached.items():
            if (req := self._requests.get(rid)) is not None:
                cached.setdefault(req[0], {})[rid] = num
        for i in rows.keys() | finished.keys() | cached.keys():
            part = StepTokens(
                tokens.step_id,
                tokens.seq_ids,
                tokens.ids,
                tokens.logprobs,
                tokens.top_ids,
                tokens.top_logprobs,
                finished.get(i, {}),
                cached.get(i, {}),
            )
            self._send(i, encode_tokens(part, rows.get(i, [])))

    def _ended(self, seq_id: str) -> None:
        """A completion ended in the core: forget its route, and its request's once all its
        completions have ended."""
        route = self._seq_owner.pop(seq_id, None)
        if route is None or (req := self._requests.get(route[1])) is None:
            return
        req[1].discard(seq_id)
        if not req[1]:
            del self._requests[route[1]]

    def _drain_inbox(self, client: int) -> None:
        inbox = self.inboxes[client]
        acks: list[list[Any]] = []
        while True:
            try:
                raw = inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = unpack(raw)
                tag = msg[0]
                if tag == Msg.ADD:
                    _, rid, prompt_ids, params, cache_salt = msg
                    acks.append([rid, self._add(client, rid, prompt_ids, params, cache_salt)])
                elif tag == Msg.ABORT:
                    for rid in msg[1]:
                        self.engine.abort(rid)
                        for sid in self._requests.pop(rid, (0, ()))[1]:
                            self._seq_owner.pop(sid, None)
                elif tag == Msg.END:
                    for sid, reason, error in msg[1]:
                        self.engine.end_sequence(sid, FinishReason(reason), error)
                        self._ended(sid)
                elif tag == Msg.STATS:
                    self._send(client, [Msg.STATS_REPLY, msg[1], self._stats()])
                elif tag == Msg.SHUTDOWN:
                    self._stop = True
                else:
                    logger.error("unknown message tag %r", tag)
            except Exception:
                logger.exception("bad message from API process %d", client)
        if acks:
            # Before stepping, so a rejection reaches the client without waiting on a step.
            self._send(client, [Msg.ACKS, acks])

    def _add(
        self,
        client: int,
        rid: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        cache_salt: str | None,
    ) -> list | None:
        try:
            sampling = SamplingParams(**params)
            seq_ids = self.engine.add_core_request(rid, prompt_ids, sampling, cache_salt=cache_salt)
        except EngineOverloaded as e:
            return [RejectKind.OVERLOADED, str(e)]
        except (RequestRejected, ValueError, TypeError) as e:
            return [RejectKind.INVALID, str(e)]
        except Exception as e:
            logger.exception("adding request %s failed", rid)
            return [RejectKind.ERROR, f"{type(e).__name__}: {e}"]
        self._requests[rid] = (client, set(seq_ids))
        for sid in seq_ids:
            self._seq_owner[sid] = (client, rid)
        return None

    def _stats(self) -> dict[str, Any]:
        e = self.engine
        return {
            "running": len(e.scheduler.running),
            "waiting": len(e.scheduler.waiting),
            "kv_usage": e.kv_usage(),
            "free_pages": e.pages.num_free,
            "cached_pages": e.pages.num_cached,
            "usable_pages": e.pages.num_usable,
            "free_slots": e.slots.num_free,
            "usable_slots": e.slots.num_usable,
            "preemptions": e.scheduler.num_preemptions,
            "prefix_cache_queries": e.scheduler.prefix_queries,
            "prefix_cache_hits": e.scheduler.prefix_hits,
            "steps": e.stats.get("steps", 0),
            "failed_requests": e.stats.get("failed_requests", 0),
        }

    def _send(self, client: int, msg: list[Any]) -> None:
        self.outboxes[client].send(pack(msg))
        self._last_sent[client] = time.monotonic()
