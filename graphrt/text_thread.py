"""Where the in-process engine's text side runs: on the step thread, or on a thread of its own.

``Engine.step`` hands each step's :class:`~graphrt.output_processor.StepTokens` (arrays of ids
and logprobs, one message per step) to a :class:`TextSide` and takes back whatever outputs are
ready. With ``threaded`` the detokenization, stop strings and ``RequestOutput`` building of
step n run on the ``graphrt-text`` thread while the step thread plans step n+2 and waits for
step n+1, so the step thread's CPU per step is the core's alone (issue #22). Outputs then
trail the core by a step or so; the text side ignores ids the core sampled for a completion
after its stop string, so they end exactly where a synchronous check ends them
(``OutputProcessor``).

Every call here is made on the step thread. The worker thread owns the ``OutputProcessor``:
requests are registered and dropped through the same queue as the steps, in order, and the
text state of a new request is built on the caller's thread, so a bad request still fails in
``add_request``.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from graphrt.output_processor import OutputProcessor, SequenceText, StepTokens, TextGroup
from graphrt.request import RequestOutput


@dataclass(slots=True)
class TextResult:
    """The text side's work on one step: its outputs, the completions it ended (stop strings,
    text errors) for the core to end too, and the time it took."""

    step_id: int
    outputs: list[RequestOutput]
    ended: list[SequenceText]
    seconds: float
    finished: list[str]  # requests whose final output is among ``outputs``


class TextSide:
    """Runs an :class:`OutputProcessor` inline or on its own thread; see the module docstring.

    ``open`` is the set of requests whose final output has not been handed out yet: with a
    thread, a request the core has finished may still be on its way through the text side.
    """

    def __init__(self, processor: OutputProcessor, threaded: bool) -> None:
        self.processor = processor
        self.open: set[str] = set()
        self._ready: list[TextResult] = []
        self._sent = 0  # steps submitted
        self._done = 0  # steps whose result was taken
        # Requests dropped while steps that may still report them were on their way (thread
        # only): request id -> the last such step, counted as ``_sent``.
        self._dropped: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        if threaded:
            self._inbox: queue.SimpleQueue = queue.SimpleQueue()
            self._outbox: queue.SimpleQueue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._loop, name="graphrt-text", daemon=True)
            self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a submitted step has not been taken back yet."""
        return self._sent > self._done

    def add(self, group: TextGroup) -> None:
        """Register a request's text state (``OutputProcessor.new_group``)."""
        self.open.add(group.request_id)
        self._send(("add", group))

    def drop(self, request_id: str) -> None:
        """Forget a request without an output (aborted by its user)."""
        self.open.discard(request_id)
        if self._thread is not None and self.busy:
            self._dropped[request_id] = self._sent
        self._send(("drop", request_id))

    def submit(self, step: StepTokens) -> None:
        """Hand over one step's ids."""
        self._sent += 1
        if self._thread is None:
            self._ready.append(_process(self.processor, step))
        else:
            self._inbox.put(("step", step))

    def take(self, block: bool) -> list[TextResult]:
        """The results ready now, in step order; with ``block``, wait for at least one while a
        step is still on its way (the core has nothing left to do meanwhile)."""
        ready, self._ready = self._ready, []
        if self._thread is not None:
            try:
                if block and not ready and self.busy:
                    ready.append(self._unpack(self._outbox.get()))
                while True:
                    ready.append(self._unpack(self._outbox.get_nowait()))
            except queue.Empty:
                pass
        opened, dropped = self.open, self._dropped
        for res in ready:
            self._done += 1
            if dropped:
                # Steps sent before a drop: an aborted request reports nothing after
                # ``abort``, as on the step thread.
                done = self._done
                res.outputs = [o for o in res.outputs if dropped.get(o.request_id, 0) < done]
                res.finished = [r for r in res.finished if dropped.get(r, 0) < done]
                self._dropped = dropped = {r: n for r, n in dropped.items() if n > done}
            opened.difference_update(res.finished)
        return ready

    def close(self) -> None:
        """Stop the thread (pending steps are dropped with it)."""
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _send(self, msg: tuple) -> None:
        if self._thread is None:
            _apply(self.processor, msg)
        else:
            self._inbox.put(msg)

    @staticmethod
    def _unpack(item: TextResult | BaseException) -> TextResult:
        if isinstance(item, BaseException):
            # A bug in the text side itself (per-completion errors fail only their completion
            # inside ``process``): surface it on the step thread rather than hang the caller.
            raise RuntimeError("the text-side thread failed") from item
        return item

    def _loop(self) -> None:
        proc = self.processor
        while True:
            msg = self._inbox.get()
            if msg is None:
                return
            try:
                if msg[0] == "step":
                    self._outbox.put(_process(proc, msg[1]))
                else:
                    _apply(proc, msg)
            except BaseException as e:
                self._outbox.put(e)


def _process(proc: OutputProcessor, step: StepTokens) -> TextResult:
    t0 = time.perf_counter()
    outs, ended = proc.process(step)
    finished = [o.request_id for o in outs if o.finished]  # here: off the step thread
    return TextResult(step.step_id, outs, ended, time.perf_counter() - t0, finished)


def _apply(proc: OutputProcessor, msg: tuple) -> None:
    if msg[0] == "add":
        proc.register(msg[1])
    else:
        proc.drop(msg[1])
