"""``Engine``: the public, in-process API. Owns the scheduler, the runner and the launcher.

The engine loop (``step``) plans step n+1, submits it, and only then waits on step n's
``copy_done`` to process n's tokens, so the CPU work of scheduling, detokenizing and stop
checks overlaps the GPU work of the step in flight (see ``overlap.py``). With ``overlap="off"``
each step is waited on right after it is submitted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import random
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphrt.config import EngineConfig
from graphrt.errors import EngineOverloaded, RequestRejected
from graphrt.memory.page_allocator import PageAllocator, SlotAllocator
from graphrt.models.model_config import ModelConfig
from graphrt.output_processor import (
    TEXT_THREAD_YIELD_ROWS,
    CoreFinish,
    OutputProcessor,
    SequenceText,
    StepTokens,
    completion_ids,
)
from graphrt.overlap import Launcher, NoProfiler, StepHandle, StepProfiler
from graphrt.request import FinishReason, Request, RequestOutput, RequestStatus
from graphrt.runner import ModelRunner
from graphrt.sampling_params import SamplingParams
from graphrt.scheduler import Scheduler
from graphrt.step_plan import MAX_BANNED_IDS, SamplerNeeds, SlotInit, StepPlan, needs_of
from graphrt.structured_outputs import StructuredOutputs
from graphrt.text_thread import TextSide
from graphrt.validation import (
    RequestLimits,
    check_logprobs,
    check_max_tokens,
    check_n,
    check_prompt,
    check_token_ids,
)

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]

__all__ = ["Engine", "EngineOverloaded", "RequestRejected"]


def resolve_model_dir(config: EngineConfig) -> Path:
    if config.model is not None:
        path = Path(config.model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"model directory {path} does not exist (graphrt loads local Hugging Face "
                "directories; it does not download from the hub)"
            )
        return path
    from graphrt.models.default_model import ensure_default_model

    return ensure_default_model()


class Engine:
    """Offline and embedded inference.

    ``Engine(model=None, **settings)``: ``model`` is a local Hugging Face directory (default:
    SmolLM2-135M-Instruct, prepared on first use); ``settings`` are :class:`EngineConfig`
    fields.
    """

    @classmethod
    def from_config(cls, config: EngineConfig, *, show_progress: bool = True) -> Engine:
        """An engine with every setting of ``config`` (``EngineConfig.from_cli_args``)."""
        settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return cls(settings.pop("model"), show_progress=show_progress, **settings)

    def __init__(self, model: str | None = None, *, show_progress: bool = True, **settings: Any):
        self.config = config = EngineConfig.from_kwargs(model=model, **settings)
        self.model_dir = resolve_model_dir(config)
        model_cfg = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = _load_tokenizer(config, self.model_dir)
        if self.tokenizer is not None:
            # Built here rather than by the first request (a fraction of a second for a large
            # vocabulary): the detokenizer's lookup table for the default skip_special_tokens.
            self.tokenizer.simple_token_texts(True)
        self.runner = ModelRunner(config, self.model_dir, model_cfg, show_progress=show_progress)
        self.model_config = self.runner.model_cfg
        self.max_model_len = self.runner.settings.max_model_len
        self.pages = PageAllocator(
            self.runner.num_pages, config.page_size, config.enable_prefix_caching
        )
        self.slots = SlotAllocator(self.runner.settings.num_slots)
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_waiting_requests=config.max_waiting_requests,
            admission_interval=config.admission_interval,
            pages=self.pages,
            slots=self.slots,
            slot_init=self._slot_init,
        )
        self.launcher = Launcher(self.runner, config.overlap, max_rows=config.max_num_seqs)
        self._eos_ids = frozenset(
            (self.tokenizer.eos_token_ids if self.tokenizer else frozenset())
            | set(self.model_config.eos_token_ids)
        )
        self._rng = random.Random(config.seed)
        # The core's view of each request: its completions, until all have finished. The
        # text side (detokenization, stop strings, outputs) is ``outputs``.
        self._groups: dict[str, list[Request]] = {}
        self._seqs: dict[str, Request] = {}
        self.outputs = OutputProcessor(
            self.tokenizer, yield_rows=TEXT_THREAD_YIELD_ROWS if config.text_thread else 0
        )
        self.text = TextSide(self.outputs, threaded=config.text_thread)
        self._inflight: StepHandle | None = None
        # A step taken early, before the next one launched, because that one's rows need
        # their grammars' masks (``_launch_next``); the loop returns its tokens.
        self._taken_early: StepTokens | None = None
        # The step after a split step, planned while the split step's forward ran and launched
        # right behind its sampler (``_finish_split``); only planned when it must take the split
        # step's tokens before it launches. The next ``_launch_next`` returns it.
        self._ahead: StepHandle | StepPlan | None = None
        # structured_outputs: the grammar service (built on first use) and the completions
        # waiting, outside the scheduler, for their grammars to compile.
        self._structured: StructuredOutputs | None = None
        self._grammar_waiting: list[Request] = []
        self._num_constrained = 0
        # Completions the core ended outside a step's ids (a grammar that failed to compile
        # or allows nothing): reported with the next step's tokens.
        self._side_finished = StepTokens()
        self.profiler: StepProfiler | NoProfiler = NoProfiler()
        self._closed = False
        self._ids = itertools.count()
        # graph_steps: decode graph replays; mixed_graph_steps: replays of steps with prefill.
        # grammar_mask_s / grammar_mask_steps: host time filling structured outputs' token
        # masks, and the steps that needed them; split_steps: those of them whose forward ran
        # while the masks were filled (``_finish_split``); grammar_accept_s: host time
        # advancing the grammars past each step's tokens (before the next step's masks).
        self.stats = {
            "steps": 0,
            "graph_steps": 0,
            "mixed_graph_steps": 0,
            "failed_requests": 0,
            "grammar_mask_steps": 0,
            "split_steps": 0,
            "grammar_mask_s": 0.0,
            "grammar_accept_s": 0.0,
        }
        self._unfreeze_gc: weakref.finalize | None = None
        if config.gc_freeze:
            # What start-up leaves (torch, transformers, the model, ~300k objects) lives as
            # long as the process; a full collection would walk all of it on the step thread.
            # Objects freed by reference counting are still freed; shutdown (or the engine's
            # end, or the interpreter's exit) unfreezes, so an engine's own reference cycles
            # are collected after it, and extension modules see no leak at exit.
            gc.freeze()
            self._unfreeze_gc = weakref.finalize(self, gc.unfreeze)

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str | None,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        stream: bool = True,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request. Raises ``RequestRejected`` for requests that can never run and
        ``EngineOverloaded`` when the queue is full. Returns the request id.

        With ``stream`` (the default), ``step()`` reports the request whenever it progresses;
        otherwise only once, when all its completions have finished. Requests share cached
        prefix pages only with requests of the same ``cache_salt`` (vLLM's name): give each
        tenant its own, and no tenant can learn from timing what another's prompts hold.
        """
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.text.open:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize_prompt(prompt)
        seq_ids = self.add_core_request(request_id, ids, params, cache_salt=cache_salt, prompt=text)
        arrival = self._groups[request_id][0].arrival_time
        try:
            group = self.outputs.new_group(request_id, seq_ids, text, ids, params, stream, arrival)
        except BaseException:
            self.abort(request_id)
            raise
        self.text.add(group)
        return request_id

    def add_core_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        prompt: str | None = None,
    ) -> list[str]:
        """Queue a request in the core only, for a text side that lives elsewhere (the
        server's API processes; see ``core_step``). Validates as ``add_request`` does. Returns
        the ids of its completions, which ``StepTokens`` rows carry."""
        if self._closed:
            raise RuntimeError("the engine has been shut down")
        if request_id in self._groups:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise RequestRejected("cache_salt must be a string")
        ids = list(prompt_ids)
        max_len = self._validate(ids, params)
        so = params.structured_outputs
        # Parsed now (a bad constraint rejects the request here), compiled off this thread.
        compiled = self.structured_outputs().start(so) if so is not None else None
        waiting = len(self.scheduler.waiting) + len(self._grammar_waiting)
        if waiting + params.n > self.config.max_waiting_requests:
            raise EngineOverloaded(
                f"{len(self.scheduler.waiting)} requests already waiting (max_waiting_requests="
                f"{self.config.max_waiting_requests}); retry later"
            )
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        needs = _sampler_needs(params)
        children = [
            Request(
                request_id=cid,
                prompt_ids=list(ids),
                params=params,
                seed=_child_seed(base_seed, i),
                max_len=max_len,
                eos_ids=self._eos_ids,
                prompt=prompt,
                group_id=request_id,
                index=i,
                needs=needs,
                cache_salt=cache_salt,
            )
            for i, cid in enumerate(completion_ids(request_id, params.n))
        ]
        for req in children:
            if compiled is not None:
                req.grammar = self.structured_outputs().matcher_state(compiled)
                self._grammar_waiting.append(req)
                self._num_constrained += 1
            else:
                self.scheduler.add(req)
            self._seqs[req.request_id] = req
        self._groups[request_id] = children
        return [c.request_id for c in children]

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its pages now. Returns False if it is unknown or done."""
        children = self._groups.get(request_id)
        was_open = request_id in self.text.open
        self.text.drop(request_id)
        if children is None:
            return was_open
        for req in children:
            if not req.finished:
                self._finish(req, FinishReason.ABORT)
        return True

    def has_unfinished(self) -> bool:
        """Whether a request has not had its final output yet (the core may have finished it
        while the text side still works on its last steps)."""
        return bool(self._groups) or bool(self.text.open)

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Plan and submit the next step, then process the previous one. Returns the outputs
        of requests that progressed (with their deltas) or finished. With the text side on its
        own thread (``text_thread``) they are the outputs it has finished since the last call,
        a step or so behind the core."""
        tokens = self.core_step()
        if tokens:
            self.text.submit(tokens)
        # With nothing in flight there is no GPU work to hide the text side's behind: wait.
        results = self.text.take(block=not tokens and self._inflight is None)
        if not results:
            return []
        outs: list[RequestOutput] = []
        for res in results:
            for seq in res.ended:
                self._end_on_text(seq)
            self.profiler.text_done(res.step_id, res.seconds)
            outs += res.outputs
        return outs

    def core_step(self) -> StepTokens:
        """The core's half of ``step``, token ids only: plan and submit the next step, take a
        finished step's ids, end requests on EOS, stop ids and length, and free what they
        held. Returns what the text side (``OutputProcessor``) needs; empty when no step ended.
        One of two loops, by the launcher's overlap mode."""
        tokens = self._overlapped_step() if self.launcher.overlapped else self._sync_step()
        if self._side_finished:
            side, self._side_finished = self._side_finished, StepTokens()
            tokens.finished.update(side.finished)
            for rid, n in side.cached.items():
                tokens.cached.setdefault(rid, n)
        return tokens

    def _sync_step(self) -> StepTokens:
        """Plan, launch, wait, process: the GPU idles while the host works (``off``)."""
        handle = self._launch_next()
        return self._consume(handle) if handle is not None else self._check_stalled()

    def _overlapped_step(self) -> StepTokens:
        """Launch step n+1, then process step n while n+1 runs."""
        handle = self._launch_next()
        prev, self._inflight = self._inflight, handle
        early, self._taken_early = self._taken_early, None
        if early is not None:  # ``prev`` was taken before ``handle`` launched
            return early
        if prev is None:
            return StepTokens() if handle is not None else self._check_stalled()
        return self._consume(prev, handle)

    def _launch_next(self) -> StepHandle | None:
        ahead, self._ahead = self._ahead, None
        if isinstance(ahead, StepHandle):  # planned and launched behind a split step's sampler
            if ahead.masked:
                self._finish_split(ahead)
            return ahead
        plan = ahead if ahead is not None else self._plan()
        if plan is None:
            return None
        if self._constrained(plan):
            # A row's mask follows from every token before it, and the step in flight holds
            # one: take that step first. A decode step runs split, its forward while the host
            # does this (``_finish_split``); any other step waits for it on the GPU.
            if self.runner.defers_masks(plan):
                handle = self.launcher.submit(plan, masked=True)
                self._finish_split(handle)
                return handle
            self._take_inflight()
            plan.token_masks = self._grammar_masks(plan)
        return self.launcher.submit(plan)

    def _plan(self) -> StepPlan | None:
        """The scheduler's next step, or None; compiled grammars' requests join it first."""
        t0 = time.perf_counter()
        if self._grammar_waiting:
            self._admit_compiled()
        plan = self.scheduler.schedule()
        if plan is not None:
            self.profiler.scheduled(plan, time.perf_counter() - t0)
            self.stats["steps"] += 1
        return plan

    def _constrained(self, plan: StepPlan) -> bool:
        return bool(self._num_constrained) and any(r.grammar is not None for r in plan.requests)

    def _take_inflight(self, nxt: StepHandle | None = None) -> None:
        """Take the step in flight now, before the loop would (``_taken_early``); ``nxt``: the
        step launched after it, whose launch goes first."""
        if self._inflight is not None:
            prev, self._inflight = self._inflight, None
            self._taken_early = self._consume(prev, nxt)

    def _finish_split(self, handle: StepHandle) -> None:
        """The rest of split step ``handle`` (``ModelRunner.defers_masks``), whose forward is
        enqueued. While the GPU runs it: take the step in flight, which advances the grammars
        past its tokens; fill this step's token masks; and, overlapped, plan the next step.
        Then launch this step's sampler and, right behind it, the next step.

        Why the next step is planned here and not by the next ``core_step``: a sampler is short
        (an argmax at temperature 0), so whatever host work lies between launching it and
        launching the next forward is GPU idle time. Planned here, that step sees what it would
        have seen there (every step up to the one in flight processed); text-side stops and new
        requests reach the step after it instead."""
        self.stats["split_steps"] += 1
        nxt: StepPlan | None = None
        masked = False
        try:
            self._take_inflight(handle)
            self._grammar_masks(handle.plan, handle.masks(self.structured_outputs().words))
            if self.launcher.overlapped:
                # Held from here: should anything below fail, the next call launches it.
                self._ahead = nxt = self._plan()
                masked = nxt is not None and self._constrained(nxt)
                if masked and not self.runner.defers_masks(nxt):
                    nxt = None  # its masks need this step's tokens: the next call takes it first
        finally:
            # Always: the launcher runs nothing after this step's forward until it has it.
            # Now, not held back to go out with the next step's forward: while the host is late
            # (its work per step outlasts the forward) the sampler must have finished by the
            # time the host waits for the step's ids.
            self.launcher.submit_masks(handle, wait=nxt is None)
        if nxt is not None:
            self._ahead = ahead = self.launcher.submit(nxt, masked=masked)
            # As submit_masks would: hand the launcher the GIL until both are enqueued.
            ahead.wait_launched()

    def _check_stalled(self) -> StepTokens:
        if self._grammar_waiting:
            # Nothing runs until a grammar compiles: wait for one briefly rather than spin.
            futures = [r.grammar.future for r in self._grammar_waiting]
            concurrent.futures.wait(futures, timeout=0.01, return_when="FIRST_COMPLETED")
            return StepTokens()
        if self.scheduler.num_unfinished and self._inflight is None:
            # Every request is admitted only if it fits alone, so this is a bug, not load.
            raise RuntimeError(
                f"scheduler stalled with {len(self.scheduler.waiting)} waiting and "
                f"{len(self.scheduler.running)} running requests"
            )
        return StepTokens()

    # ---- structured outputs ---------------------------------------------------------------
    def structured_outputs(self) -> StructuredOutputs:
        """The grammar service, built on the first request that needs it."""
        if self._structured is None:
            if self.tokenizer is None:
                raise RequestRejected(
                    "structured_outputs needs the model's tokenizer, and this engine has none",
                    param="structured_outputs",
                )
            self._structured = StructuredOutputs(
                self.tokenizer.hf,
                self.model_config.vocab_size,
                self._eos_ids,
                mask_threads=self.config.grammar_threads,
                json_whitespace=self.config.json_whitespace,
            )
        return self._structured

    def _admit_compiled(self) -> None:
        """Hand completions whose grammar has compiled to the scheduler; end those whose
        compilation failed or ran out of time."""
        so = self.structured_outputs()
        for req in list(self._grammar_waiting):
            err = so.poll(req.grammar)
            if err is not None:
                self._grammar_waiting.remove(req)
                self._fail(req, err, self._side_finished)
            elif req.grammar.matcher is not None:
                self._grammar_waiting.remove(req)
                self.scheduler.add(req)

    def _grammar_masks(self, plan: StepPlan, out: np.ndarray | None = None) -> np.ndarray:
        """The step's allowed-token bitmasks: one row per plan row, in the first rows of
        ``out`` if given; rows that sample nothing this step, or have no grammar, allow
        everything. A grammar that allows nothing ends its request with an error (its row
        samples unconstrained, into a finished request)."""
        t0 = time.perf_counter()
        so = self.structured_outputs()
        samples = None if plan.is_decode else plan.samples
        states = [
            r.grammar if (samples is None or samples[i]) and not r.finished else None
            for i, r in enumerate(plan.requests)
        ]
        if out is None:
            masks = np.empty((plan.batch_size, so.words), dtype=np.int32)
        else:
            masks = out[: plan.batch_size]
        for i in so.fill(states, masks):
            req = plan.requests[i]
            self._fail(req, "the grammar allows no next token", self._side_finished)
        self.stats["grammar_mask_steps"] += 1
        self.stats["grammar_mask_s"] += time.perf_counter() - t0
        return masks

    def _accept_grammars(
        self, plan: StepPlan, ids: list[int], samples: list[bool] | None
    ) -> dict[int, bool]:
        """Advance the grammar of each constrained row that sampled this step past its token,
        all in one batch. Returns, by row, whether the grammar took it."""
        rows = [
            r
            for r, req in enumerate(plan.requests)
            if req.grammar is not None
            and req.status is not RequestStatus.FINISHED
            and (samples is None or samples[r])
        ]
        if not rows:
            return {}
        t0 = time.perf_counter()
        states = [plan.requests[r].grammar for r in rows]
        ok = self.structured_outputs().accept(states, [ids[r] for r in rows])
        self.stats["grammar_accept_s"] += time.perf_counter() - t0
        return dict(zip(rows, ok, strict=True))

    def _grammar_ends(self, req: Request, tok: int, tokens: StepTokens, accepted: bool) -> bool:
        """Take the verdict of ``req``'s grammar on ``tok`` (``_accept_grammars``). True if that
        ended the request: the token broke the grammar (an error), or completed it (a stop,
        also under ``ignore_eos``)."""
        g = req.grammar
        if not accepted:
            self._fail(req, f"token {tok} does not follow the request's grammar", tokens)
            return True
        if g.terminated:
            stop = tok if tok in req.params.stop_token_ids else None
            tokens.finished[req.request_id] = CoreFinish(FinishReason.STOP, stop)
            self._finish(req, FinishReason.STOP)
            return True
        return False

    @property
    def inflight_plan(self) -> StepPlan | None:
        """The plan of the step submitted and not yet processed (overlapped modes), if any."""
        return self._inflight.plan if self._inflight is not None else None

    def use_launcher(self, launcher: Launcher) -> None:
        """Run the following steps through ``launcher`` (anything with ``Launcher``'s
        interface: ``submit``, ``mode``, ``overlapped``, ``profiler``, ``shutdown``), shutting
        the current one down. For benchmarks that time the scheduler without a model
        (``benchmarks/cpu_step_cost.py``). Needs an idle engine."""
        if self.has_unfinished() or self._inflight is not None:
            raise RuntimeError("use_launcher needs an idle engine")
        self.launcher.shutdown()
        self.launcher = launcher

    def set_overlap(self, mode: str) -> None:
        """Switch the overlap mode between requests (benchmarks compare modes on one engine)."""
        if self.has_unfinished() or self._inflight is not None:
            raise RuntimeError("set_overlap needs an idle engine")
        EngineConfig(overlap=mode)  # validates the name
        profiler = self.launcher.profiler
        self.launcher.shutdown()
        self.launcher = Launcher(self.runner, mode, max_rows=self.config.max_num_seqs)
        self.launcher.profiler = profiler

    def set_profiler(self, profiler: StepProfiler | None) -> None:
        """Attach a :class:`StepProfiler` (None detaches it): the step loops' one hook, timing
        planning, taking ids and the text side per step; the launcher records the GPU events.
        Detached, the hook is a :class:`NoProfiler`, whose calls do nothing."""
        self.profiler = profiler if profiler is not None else NoProfiler()
        self.launcher.profiler = profiler

    def _consume(self, handle: StepHandle, nxt: StepHandle | None = None) -> StepTokens:
        """Wait for ``handle``'s ids and take them (``_take``); ``nxt``: the step launched
        after it, whose launch may have to go first. Timed for the profiler hook."""
        t0 = time.perf_counter()
        tokens, yielded = self._take(handle, nxt)
        cpu = time.perf_counter() - t0 - handle.wait_s
        self.profiler.consumed(handle.step_id, cpu, handle.wait_s, yielded)
        return tokens

    def _take(self, handle: StepHandle, nxt: StepHandle | None) -> tuple[StepTokens, int | None]:
        plan = handle.plan
        tokens = StepTokens(step_id=plan.step_id)
        yielded = None
        try:
            res = handle.result()
            if nxt is not None and not nxt.launched:
                # This step has finished and the next one is not launched yet: the GPU has run
                # dry, and the launcher thread needs the GIL, which this thread would hold for
                # all of the processing below (CPython hands it over only after its 5 ms switch
                # interval or at a blocking call). Let the launch go first. While this step is
                # still running on the GPU, the wait in result() lets the launcher in instead.
                t0 = time.perf_counter()
                nxt.wait_launched()
                handle.wait_s += time.perf_counter() - t0
                yielded = nxt.step_id
        except Exception as e:
            logger.exception("step %d failed", plan.step_id)
            handle.release()
            for req in plan.requests:
                if not req.finished:
                    self._fail(req, f"step failed: {type(e).__name__}: {e}", tokens)
            return tokens, yielded
        self.scheduler.step_done(plan)
        if res.graph_bs is not None:
            self.stats["graph_steps"] += 1
        elif res.graph_tokens is not None:
            self.stats["mixed_graph_steps"] += 1
        # One conversion per step: indexing numpy scalars per row costs more than the row.
        ids = res.ids.tolist()
        samples = None if plan.is_decode else plan.samples.tolist()  # decode rows all sample
        lps = res.logprob.tolist() if res.logprob is not None else None
        if lps is not None:
            top_ids, top_lps = res.top_ids.tolist(), res.top_logprobs.tolist()
            tokens.logprobs, tokens.top_ids, tokens.top_logprobs = [], [], []
        finished = RequestStatus.FINISHED
        # Constrained rows' grammars advance first, in one batch; each row's verdict is then
        # taken in the loop below, where it was always taken.
        accepted = self._accept_grammars(plan, ids, samples) if self._num_constrained else None
        seq_ids, out_ids = tokens.seq_ids, tokens.ids
        # This loop runs for every row of every step (at batch 256 it is most of the core's
        # CPU time per step): ids only, flat.
        for r, req in enumerate(plan.requests):
            if req.status is finished or (samples is not None and not samples[r]):
                continue  # the extra step of a finished request, or a partial prefill chunk
            req.num_pending -= 1
            tok = ids[r]
            out = req.output_ids
            out.append(tok)
            seq_ids.append(req.request_id)
            out_ids.append(tok)
            if lps is not None:
                tokens.logprobs.append(lps[r])
                tokens.top_ids.append(top_ids[r])
                tokens.top_logprobs.append(top_lps[r])
            if len(out) == 1 and req.index == 0:
                tokens.cached[req.group_id] = req.num_cached_tokens
            if req.grammar is not None and self._grammar_ends(req, tok, tokens, accepted[r]):
                continue
            if tok in req.stop_ids:
                # A stop token id wins over EOS (an id in both reports itself as the reason).
                stop = tok if tok in req.params.stop_token_ids else None
                tokens.finished[req.request_id] = CoreFinish(FinishReason.STOP, stop)
                self._finish(req, FinishReason.STOP)
            elif len(out) >= req.max_output:
                tokens.finished[req.request_id] = CoreFinish(FinishReason.LENGTH)
                self._finish(req, FinishReason.LENGTH)
        handle.release()
        return tokens, yielded

    def _finish(self, req: Request, reason: FinishReason) -> None:
        """End a completion in the core: free its pages and slot, forget it once its whole
        request has ended."""
        req.finish_reason = reason
        if req.grammar is not None:
            req.grammar = None  # its matcher, and a compile future nobody else waits for
            self._num_constrained -= 1
            if req in self._grammar_waiting:
                self._grammar_waiting.remove(req)
        self.scheduler.finish(req)
        self._seqs.pop(req.request_id, None)
        children = self._groups.get(req.group_id)
        if children is not None and all(c.finished for c in children):
            del self._groups[req.group_id]

    def _fail(self, req: Request, message: str, tokens: StepTokens) -> None:
        req.error = message
        tokens.finished[req.request_id] = CoreFinish(FinishReason.ERROR, error=message)
        if req.index == 0:
            tokens.cached.setdefault(req.group_id, req.num_cached_tokens)
        self._finish(req, FinishReason.ERROR)
        self.stats["failed_requests"] += 1

    def _end_on_text(self, seq: SequenceText) -> None:
        """The text side ended a completion (a stop string, or a detokenizer error)."""
        if seq.error is not None:
            logger.error("request %s failed while processing its output: %s", seq.request_id,
                         seq.error)  # fmt: skip
        self.end_sequence(seq.request_id, seq.finish_reason or FinishReason.STOP, seq.error)

    def end_sequence(self, seq_id: str, reason: FinishReason, error: str | None = None) -> bool:
        """End one completion in the core because its text side ended it (a stop string, or a
        text error when ``error`` is given) and free what it holds. Ids it was sampled after
        that point are the text side's to ignore. Returns False if the core had already ended
        it."""
        req = self._seqs.get(seq_id)
        if error is not None:
            self.stats["failed_requests"] += 1
        if req is None or req.finished:
            return False
        req.error = error
        self._finish(req, reason)
        return True

    def drain(self) -> list[RequestOutput]:
        """Run steps until every request has finished."""
        outs = []
        while self.has_unfinished() or self._inflight is not None:
            outs.extend(self.step())
        return outs

    # ---- convenience ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        ids = [self.add_request(None, p, sp, stream=False) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(ids):
                for out in self.step():
                    if out.finished:
                        final[out.request_id] = out
            self._flush()
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        return [final[i] for i in ids]

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield a ``RequestOutput`` each time the request progresses; each carries the new text
        and ids in ``delta_text``/``delta_token_ids``. Closing the iterator aborts the request."""
        rid = self.add_request(None, prompt, sampling_params)
        done = False
        try:
            while not done:
                for out in self.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
            self._flush()
        finally:
            if not done:
                self.abort(rid)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the chat template."""
        tok = self._need_tokenizer("chat")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            tok.apply_chat_template(c, add_generation_prompt=True, **template_kwargs) for c in convs
        ]
        return self.generate(prompts, sampling_params)

    def _flush(self) -> None:
        """Consume a step still in flight (its tokens belong to finished requests)."""
        while self._inflight is not None and not self.has_unfinished():
            self.step()

    # ---- helpers --------------------------------------------------------------------------
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise RequestRejected(f"{what} needs a tokenizer, and {self.model_dir} has none")
        return self.tokenizer

    def _tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._need_tokenizer("a text prompt").encode(prompt)
        if not isinstance(prompt, Sequence) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise RequestRejected("prompt must be a string or a list of token ids")
        return None, list(prompt)

    @functools.cached_property
    def request_limits(self) -> RequestLimits:
        """The limits every request is checked against (``graphrt.validation``)."""
        return RequestLimits(
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            max_logprobs=self.config.max_logprobs,
            max_n=self.config.max_num_seqs,
            max_n_setting="max_num_seqs",
        )

    def _validate(self, ids: list[int], params: SamplingParams) -> int:
        """Check a request against the engine's limits; returns its max total length."""
        limits = self.request_limits
        check_prompt(ids, limits)
        max_len = check_max_tokens(len(ids), params.max_tokens, limits)
        check_logprobs(params.logprobs, limits)
        check_n(params.n, limits)
        if params.min_tokens and len(params.stop_token_ids) + len(self._eos_ids) > MAX_BANNED_IDS:
            raise RequestRejected(
                f"min_tokens needs at most {MAX_BANNED_IDS} stop and EOS ids to ban; "
                f"{len(params.stop_token_ids)} stop_token_ids given",
                param="stop_token_ids",
            )
        check_token_ids(params.stop_token_ids, limits.vocab_size, "stop_token_ids")
        need = self.pages.pages_for(max_len)
        if need > self.pages.num_usable:
            raise RequestRejected(
                f"request needs {need} KV pages ({max_len} tokens) but the pool has "
                f"{self.pages.num_usable}; lower max_tokens, or give the KV cache more memory "
                "(gpu_memory_utilization, num_pages, cpu_kv_cache_gb)",
                param="max_tokens",
            )
        return max_len

    def _slot_init(self, req: Request, slot: int) -> SlotInit:
        p = req.params
        banned: tuple[int, ...] = ()
        if p.min_tokens:
            eos = () if p.ignore_eos else tuple(sorted(self._eos_ids))
            banned = tuple(dict.fromkeys(eos + p.stop_token_ids))
        penalties = p.uses_penalties
        return SlotInit(
            slot=slot,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else 0,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            seed=req.seed,
            min_pos=len(req.prompt_ids) + p.min_tokens,
            banned_ids=banned,
            penalty_prompt_ids=tuple(req.prompt_ids) if penalties else None,
            penalty_output_ids=tuple(req.output_ids) if penalties else None,
        )

    # ---- lifecycle ------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Abort what is left, stop the launcher thread and free the device memory (weights,
        KV pool, graphs). The engine cannot be used afterwards. Calling it twice is harmless."""
        if self._closed:
            return
        for rid in list(self._groups):
            self.abort(rid)
        ahead, self._ahead = self._ahead, None
        for handle in (self._inflight, ahead):
            if not isinstance(handle, StepHandle):
                continue
            if handle.masked and not handle.masks_submitted:
                # Its rows are aborted: their masks allow everything, and its ids are dropped.
                self._grammar_masks(handle.plan, handle.masks(self.structured_outputs().words))
                self.launcher.submit_masks(handle)
            with contextlib.suppress(Exception):
                handle.result()
            handle.release()
        self._inflight = None
        self.launcher.shutdown()
        self.text.close()
        self.runner.close()
        if self._structured is not None:
            self._structured.close()
        if self._unfreeze_gc is not None:
            self._unfreeze_gc()  # every frozen object, another live engine's too (only speed)
        self._closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def kv_usage(self) -> float:
        """Fraction of usable KV pages in use."""
        return self.pages.num_used / self.pages.num_usable


def _sampler_needs(p: SamplingParams) -> SamplerNeeds:
    return needs_of(
        full=not p.greedy or p.uses_penalties or p.min_tokens > 0,
        filters=not p.greedy and p.uses_filters,
        logprobs=p.logprobs is not None,
    )


def _child_seed(seed: int, index: int) -> int:
    if index == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
    return params


def _load_tokenizer(config: EngineConfig, model_dir: Path):
    from graphrt.tokenizer import Tokenizer

    path = Path(config.tokenizer) if config.tokenizer else model_dir
    has_files = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if not has_files:
        if config.tokenizer:
            raise FileNotFoundError(f"tokenizer directory {path} has no tokenizer files")
        logger.warning("%s has no tokenizer; only token-id prompts are accepted", model_dir)
        return None
    return Tokenizer.from_pretrained(path)
