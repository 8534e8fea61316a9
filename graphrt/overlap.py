"""Launching steps: the launcher thread, ``StepHandle`` and its one ``copy_done`` event.

For each step the launcher enqueues, on the forward stream: the graph replay, which reads the
plan from a pinned ring slot and writes the sampled ids back into it (``StepIO``), or the eager
step with its H2D copies and a non-blocking D2H copy of the ids into pinned memory owned by the
step's handle; then the record of that handle's ``copy_done`` event. The scheduler submits
step n+1 before it waits on step n's ``copy_done``, so its CPU work hides under step n+1.

Ownership rules (SGLang PR #5788 fixed a bug where a shared ``launch_done`` was overwritten by
the next step; here it cannot happen):

- every event and pinned buffer a step uses belongs to its ``StepHandle``, drawn from a pool and
  returned only when the handle is released after its results were consumed; a graph step's
  ring slot is held the same way (``StepIOLease``), and the pool has as many entries as the
  ring has slots;
- a handle's results can be consumed once; a second ``result()`` or an early ``release()`` raises;
- the handle keeps the step's device outputs alive until it is released.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from graphrt.capture.static_buffers import RING_SLOTS
from graphrt.config import OverlapMode
from graphrt.runner import ModelRunner, StepOutputs
from graphrt.step_plan import StepPlan


class StepOwnershipError(RuntimeError):
    """A step's results were consumed twice, or its resources returned before consumption."""


@dataclass
class HostOutputs:
    """Pinned host arrays a step's sampled ids (and logprobs) are copied into."""

    ids: torch.Tensor
    logprob: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


@dataclass
class StepResult:
    """A step's results on the host; numpy views of the handle's pinned buffers."""

    ids: np.ndarray
    logprob: np.ndarray | None
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None
    graph_bs: int | None  # the decode bucket replayed, or None
    graph_tokens: int | None = None  # the mixed token bucket replayed, or None


class _Resources:
    """One pinned output buffer and one event pair, lent to a single step at a time."""

    def __init__(self, rows: int, k: int, device: torch.device, ident: int) -> None:
        pin = device.type == "cuda"
        self.ident = ident
        self.host = HostOutputs(
            ids=torch.zeros(rows, dtype=torch.int64, pin_memory=pin),
            logprob=torch.zeros(rows, dtype=torch.float32, pin_memory=pin),
            top_ids=torch.zeros(rows, max(k, 1), dtype=torch.int64, pin_memory=pin),
            top_logprobs=torch.zeros(rows, max(k, 1), dtype=torch.float32, pin_memory=pin),
        )
        self.copy_done = torch.cuda.Event() if pin else None
        self.owner: int | None = None
        self._pin = pin
        self._rows = rows
        # int32 [rows, words] token masks of a split step (structured outputs), made on the
        # first one: the host fills them while the step's forward runs.
        self.masks: torch.Tensor | None = None

    def mask_buffer(self, words: int) -> torch.Tensor:
        if self.masks is None:
            self.masks = torch.empty(self._rows, words, dtype=torch.int32, pin_memory=self._pin)
        return self.masks


class ResourcePool:
    """A fixed set of per-step resources. ``acquire`` blocks while all are lent out."""

    def __init__(self, size: int, rows: int, k: int, device: torch.device) -> None:
        self._all = [_Resources(rows, k, device, i) for i in range(size)]
        self._free: queue.SimpleQueue[_Resources] = queue.SimpleQueue()
        for r in self._all:
            self._free.put(r)

    def acquire(self, step_id: int) -> _Resources:
        r = self._free.get()
        if r.owner is not None:
            raise StepOwnershipError(
                f"resources {r.ident} handed to step {step_id} while step {r.owner} owns them"
            )
        r.owner = step_id
        return r

    def release(self, r: _Resources, step_id: int) -> None:
        if r.owner != step_id:
            raise StepOwnershipError(
                f"step {step_id} returned resources {r.ident} owned by step {r.owner}"
            )
        r.owner = None
        self._free.put(r)


class StepHandle:
    """One launched step: its plan, its outputs, its ``copy_done`` event.

    A split step (``masked``; structured outputs) launches in two parts: its forward on
    ``Launcher.submit``, its sampler and copies on ``Launcher.submit_masks``, once the host has
    written the step's token masks into ``masks()``. Its results are ready after both."""

    def __init__(
        self, plan: StepPlan, res: _Resources, pool: ResourcePool, masked: bool = False
    ) -> None:
        self.plan = plan
        self.masked = masked
        self._res = res
        self._pool = pool
        self._outputs: StepOutputs | None = None  # keeps device tensors alive
        self._launched = threading.Event()  # the step's first (or only) part is enqueued
        self._done = threading.Event()  # all of it is enqueued, copy_done recorded (or failed)
        self._error: BaseException | None = None
        self._consumed = False
        self._released = False
        self.masks_submitted = False  # a split step's sampler is handed to the launcher
        self.wait_s = 0.0  # time result() blocked on the launch and copy_done

    @property
    def step_id(self) -> int:
        return self.plan.step_id

    def wait_launched(self) -> None:
        """Block until the launcher has enqueued this step (the ``launch_done`` of two_events)."""
        self._launched.wait()

    @property
    def launched(self) -> bool:
        """Whether the launcher has enqueued this step (or failed to)."""
        return self._launched.is_set()

    def masks(self, words: int) -> np.ndarray:
        """The pinned int32 ``[max rows, words]`` host array a split step's token masks go in
        (its first ``plan.batch_size`` rows), before ``Launcher.submit_masks``."""
        if not self.masked:
            raise StepOwnershipError(f"step {self.step_id} is not a split step; it has no masks")
        return self._res.mask_buffer(words).numpy()

    def result(self) -> StepResult:
        """Wait for this step's ``copy_done`` and return its ids. Callable once."""
        if self._consumed:
            raise StepOwnershipError(f"step {self.step_id}: results consumed twice")
        if self._released:
            raise StepOwnershipError(f"step {self.step_id}: results read after release")
        self._consumed = True
        t0 = time.perf_counter()
        self._done.wait()
        if self._error is not None:
            raise self._error
        if self._res.copy_done is not None:
            self._res.copy_done.synchronize()
        self.wait_s = time.perf_counter() - t0
        b = self.plan.batch_size
        h = self._res.host
        lp = self.plan.needs.logprobs
        io = self._outputs.io if self._outputs is not None else None
        if io is not None:
            io.check()
        return StepResult(
            ids=io.ids[:b] if io is not None else h.ids.numpy()[:b],
            logprob=h.logprob.numpy()[:b] if lp else None,
            top_ids=h.top_ids.numpy()[:b] if lp else None,
            top_logprobs=h.top_logprobs.numpy()[:b] if lp else None,
            graph_bs=self._outputs.graph_bs if self._outputs is not None else None,
            graph_tokens=self._outputs.graph_tokens if self._outputs is not None else None,
        )

    def release(self) -> None:
        """Return the pinned buffer and event to the pool. Only after ``result()``."""
        if self._released:
            raise StepOwnershipError(f"step {self.step_id}: released twice")
        if not self._consumed:
            raise StepOwnershipError(
                f"step {self.step_id}: released before its results were consumed; its event "
                "and buffer could be reused while the copy is in flight"
            )
        self._done.wait()
        self._released = True
        if self._outputs is not None and self._outputs.io is not None:
            self._outputs.io.release()
        self._outputs = None
        self._pool.release(self._res, self.step_id)

    # ---- called by the launcher -----------------------------------------------------------
    def _launch(self, runner: ModelRunner) -> None:
        """Enqueue the step, or a split step's forward."""
        try:
            if self.masked:
                self._outputs = runner.execute(self.plan, masked=True)
            else:
                self._outputs = runner.execute(self.plan)
                self._copy_out()
        except BaseException as e:  # surfaced to the scheduler by result()
            self._error = e
        finally:
            self._launched.set()
            if not self.masked or self._error is not None:
                self._done.set()

    def _launch_sampler(self, runner: ModelRunner) -> None:
        """Enqueue a split step's sampler, with the masks the host wrote, and its copies."""
        try:
            if self._error is None:
                runner.execute_sampler(self.plan, self._outputs, self._res.masks)
                self._copy_out()
        except BaseException as e:
            self._error = e
        finally:
            self._done.set()

    def _fail(self, e: BaseException) -> None:
        self._error = e
        self._launched.set()
        self._done.set()

    def _copy_out(self) -> None:
        b = self.plan.batch_size
        h, o = self._res.host, self._outputs.out
        if self._outputs.io is None:  # a graph step writes its ids into its ring slot itself
            h.ids[:b].copy_(o.ids[:b], non_blocking=True)
        if self.plan.needs.logprobs:
            h.logprob[:b].copy_(o.logprob[:b], non_blocking=True)
            h.top_ids[:b].copy_(o.top_ids[:b], non_blocking=True)
            h.top_logprobs[:b].copy_(o.top_logprobs[:b], non_blocking=True)
        if self._res.copy_done is not None:
            self._res.copy_done.record()


@dataclass
class StepRecord:
    """Timings of one step, for benchmarks (see ``StepProfiler``)."""

    step_id: int
    batch_size: int
    is_decode: bool
    num_tokens: int = 0  # tokens fed this step (decode rows + prefill chunk tokens)
    decode_rows: int = 0  # rows that feed one already-sampled token
    page_updates: int = 0  # page-table entries this step writes before it runs
    mean_kv_len: float = 0.0  # rows' KV length after this step, averaged (attention's work)
    schedule_s: float = 0.0  # scheduler thread: planning this step
    launch_s: float = 0.0  # launcher: prepare, replay or eager step, copies, event records
    wait_s: float = 0.0  # scheduler thread: blocked on this step's copy_done
    # The step before had already ended on the GPU when this one was fully enqueued: the GPU
    # waited for the host (the ``end`` - ``start`` gap cannot show it: ``start`` is recorded
    # before the launch's own CPU work).
    late: bool = False
    # A split step (structured outputs): its forward had ended on the GPU when its sampler was
    # enqueued, so the GPU waited for the host's masks (``late`` cannot show it: it is set at
    # the forward's launch). ``mid`` is recorded after the forward.
    masks_late: bool = False
    mid: torch.cuda.Event | None = None
    # ``thread`` mode: the step before had finished when the scheduler got its ids and this one
    # was not launched yet, so the scheduler let the launch go first (``Engine._consume``).
    yielded: bool = False
    process_s: float = 0.0  # scheduler thread: the core consuming this step's ids (CPU work)
    text_s: float = 0.0  # in-process Engine.step: the text side (OutputProcessor.process)
    graph_bs: int | None = None
    graph_tokens: int | None = None  # the mixed token bucket replayed
    start: torch.cuda.Event | None = None  # recorded before the step's first GPU work
    end: torch.cuda.Event | None = None  # recorded after its D2H copy


class StepProfiler:
    """Opt-in per-step CPU times and GPU start/end events. Off (None) in normal serving, where
    the only cost is one ``is None`` test per step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.records: dict[int, StepRecord] = {}
        self.last_end: torch.cuda.Event | None = None  # the last launched step's end event

    # The engine's hook (``Engine.set_profiler``): its loops call these every step.
    def scheduled(self, plan: StepPlan, seconds: float) -> None:
        self.record(plan).schedule_s = seconds

    def consumed(self, step_id: int, seconds: float, wait_s: float, yielded: int | None) -> None:
        """Step ``step_id``'s ids were taken in ``seconds`` of CPU after ``wait_s`` of waiting;
        ``yielded``: the next step, whose launch went first (``thread`` mode)."""
        rec = self.records.get(step_id)
        if rec is not None:
            rec.wait_s, rec.process_s = wait_s, seconds
        if yielded is not None and (nxt := self.records.get(yielded)) is not None:
            nxt.yielded = True

    def text_done(self, step_id: int, seconds: float) -> None:
        rec = self.records.get(step_id)
        if rec is not None:
            rec.text_s = seconds

    def record(self, plan: StepPlan) -> StepRecord:
        decode_rows = plan.batch_size if plan.is_decode else int((plan.input_ids < 0).sum())
        r = StepRecord(plan.step_id, plan.batch_size, plan.is_decode, plan.num_tokens, decode_rows)
        r.page_updates = int(plan.page_updates.shape[1])
        r.mean_kv_len = float(plan.seq_lens.mean()) if plan.batch_size else 0.0
        if self.cuda:
            r.start = torch.cuda.Event(enable_timing=True)
            r.end = torch.cuda.Event(enable_timing=True)
        self.records[plan.step_id] = r
        return r


class NoProfiler:
    """The engine's hook when no :class:`StepProfiler` is attached: every call does nothing."""

    def scheduled(self, plan: StepPlan, seconds: float) -> None:
        pass

    def consumed(self, step_id: int, seconds: float, wait_s: float, yielded: int | None) -> None:
        pass

    def text_done(self, step_id: int, seconds: float) -> None:
        pass


class Launcher:
    """Runs steps on the forward stream, on its own thread (``thread``, ``two_events``) or on
    the caller's (``inline``, ``off``)."""

    def __init__(self, runner: ModelRunner, mode: OverlapMode, max_rows: int) -> None:
        self.runner = runner
        self.mode = mode
        dev = runner.device
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        # Steps in flight at once: the one being processed, the one running, one being queued.
        # Each may hold a slot of the decode graphs' ring, which has as many.
        self.pool = ResourcePool(RING_SLOTS, max_rows, runner.max_logprobs, dev)
        self._queue: queue.SimpleQueue[tuple[StepHandle, bool] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.profiler: StepProfiler | None = None
        if mode in ("thread", "two_events"):
            self._thread = threading.Thread(target=self._loop, name="graphrt-launcher", daemon=True)
            self._thread.start()

    @property
    def overlapped(self) -> bool:
        """Whether the scheduler submits step n+1 before consuming step n."""
        return self.mode != "off"

    def submit(self, plan: StepPlan, masked: bool = False) -> StepHandle:
        """Launch ``plan``'s step. ``masked``: a split step (``ModelRunner.defers_masks``):
        only its forward now; the caller writes its token masks into ``handle.masks`` and then
        must call ``submit_masks`` before submitting anything else."""
        handle = StepHandle(plan, self.pool.acquire(plan.step_id), self.pool, masked)
        if self._thread is None:
            self._run(handle, False)
            return handle
        self._queue.put((handle, False))
        if self.mode == "two_events":
            # The pre-SGLang-#4790 protocol, for the benchmarks: the scheduler also waits for
            # the step's launch (its launch_done) before it goes on.
            handle.wait_launched()
        return handle

    def submit_masks(self, handle: StepHandle, wait: bool = True) -> None:
        """Launch the rest of split step ``handle`` (its sampler and copies), with the token
        masks the caller wrote into ``handle.masks``. ``wait=False``: the caller submits the
        next step at once and waits for that one's launch instead."""
        if not handle.masked:
            raise StepOwnershipError(f"step {handle.step_id} is not a split step")
        if handle.masks_submitted:
            raise StepOwnershipError(f"step {handle.step_id}: masks submitted twice")
        handle.masks_submitted = True
        if self._thread is None:
            self._run(handle, True)
            return
        self._queue.put((handle, True))
        if wait:
            # The GPU may already wait for this sampler. Block until the launcher has enqueued
            # it: the wait hands the launcher the GIL now, where carrying on with the next
            # step's planning would hold it until a blocking call or CPython's 5 ms switch
            # interval.
            handle._done.wait()

    def _run(self, handle: StepHandle, sampler: bool) -> None:
        try:
            if self.stream is None:
                self._launch(handle, sampler)
                return
            with torch.cuda.stream(self.stream):
                self._launch(handle, sampler)
        except BaseException as e:  # a failure outside the step's own: fail the step
            handle._fail(e)

    def _launch(self, handle: StepHandle, sampler: bool) -> None:
        launch = handle._launch_sampler if sampler else handle._launch
        prof = self.profiler
        if prof is None:
            launch(self.runner)
            return
        rec = prof.records.get(handle.step_id) or prof.record(handle.plan)
        t0 = time.perf_counter()
        if rec.start is not None and not sampler:
            rec.start.record()
        if sampler and rec.mid is not None:
            rec.masks_late = rec.mid.query()
        launch(self.runner)
        if rec.start is not None and not sampler and handle.masked:
            rec.mid = torch.cuda.Event()
            rec.mid.record()
        last = sampler or not handle.masked  # this call enqueued the step's end
        if rec.end is not None and last:
            rec.end.record()
        rec.launch_s += time.perf_counter() - t0
        if rec.end is not None:
            if not sampler:  # what follows the step before on the GPU is enqueued now
                prev = prof.last_end
                rec.late = prev is not None and prev.query()
            if last:
                prof.last_end = rec.end
        rec.graph_bs = handle._outputs.graph_bs if handle._outputs is not None else None
        rec.graph_tokens = handle._outputs.graph_tokens if handle._outputs is not None else None

    def _loop(self) -> None:
        if self.stream is not None:
            torch.cuda.set_device(self.runner.device)
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._run(*job)

    def shutdown(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
