"""``MockEngine``: a stand-in for :class:`~graphrt.engine.Engine` inside the engine-core process,
for measuring the API side without a model or a GPU (``--mock-engine-step-ms``, used by
``benchmarks/api_capacity.py``).

It loads nothing and computes nothing: every ``step_s`` seconds each running completion gets one
token id, as a decode step on a real GPU would deliver them, and a completion finishes after
exactly ``max_tokens`` tokens (or when the API side ends it on a stop string). The API side
reads the ids as words through :class:`MockTokenizer` (a fixed id-to-word mapping). Everything
around it is the real server: the engine-core loop, the wire format, the API process(es) and
their text side, HTTP and SSE. Admission is FIFO up to ``max_num_seqs`` running completions;
KV pages and request slots are counted (not allocated), so the engine gauges and
abort-frees-pages behave as with a real engine. Stop ids, EOS, ``min_tokens`` and penalties
are accepted and ignored.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphrt.errors import EngineOverloaded, RequestRejected
from graphrt.output_processor import CoreFinish, StepTokens, completion_ids
from graphrt.request import FinishReason
from graphrt.sampling_params import SamplingParams
from graphrt.validation import RequestLimits, check_logprobs, check_max_tokens, check_prompt

# Words of about four characters, like an average BPE token of English text.
_WORDS = (" the", " time", " of", " year", " and", " people", " way", " day", " to", " world")


class MockTokenizer:
    """The API side's tokenizer for the mock engine: ids read as fixed words."""

    def new_detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool = True):
        return _MockDetokenizer()


class _MockDetokenizer:
    def step_one(self, token_id: int) -> str:
        return _WORDS[token_id % len(_WORDS)]

    def step(self, ids: list[int]) -> str:
        return "".join(self.step_one(t) for t in ids)

    def flush(self) -> str:
        return ""


@dataclass
class _Group:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    generated: list[int] = field(default_factory=list)  # per choice
    pages: int = 0
    seq_ids: list[str] = field(default_factory=list)  # per choice


class _Pages:
    def __init__(self, num_usable: int, page_size: int) -> None:
        self.num_usable = num_usable
        self.page_size = page_size
        self.num_free = num_usable
        self.num_cached = 0  # the mock caches nothing

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free


class _Slots:
    """Request slots: one per running completion, as the engine's ``SlotAllocator`` hands out."""

    def __init__(self, num_usable: int, scheduler: _Scheduler) -> None:
        self.num_usable = num_usable
        self._scheduler = scheduler

    @property
    def num_free(self) -> int:
        return self.num_usable - sum(g.params.n for g in self._scheduler.running)


class _Scheduler:
    def __init__(self) -> None:
        self.running: list[_Group] = []
        self.waiting: list[_Group] = []
        self.num_preemptions = 0
        self.prefix_queries = self.prefix_hits = 0  # the mock caches nothing


class _Info:
    """What ``engine_core._engine_info`` reads besides the engine's own attributes."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class MockEngine:
    """Duck-types the parts of :class:`~graphrt.engine.Engine` that the engine core uses."""

    def __init__(
        self,
        step_s: float,
        *,
        model: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_waiting_requests: int = 4096,
        max_logprobs: int = 20,
        page_size: int = 16,
        num_pages: int | None = None,
        **_ignored: Any,
    ) -> None:
        if step_s <= 0:
            raise ValueError(f"the mock engine's step period must be > 0, got {step_s}")
        vocab_size, context = 32000, 4096
        cfg_path = Path(model).expanduser() / "config.json" if model else None
        if cfg_path is not None and cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            vocab_size = int(cfg.get("vocab_size", vocab_size))
            context = int(cfg.get("max_position_embeddings", context))
        self.step_s = step_s
        self.model_dir = str(cfg_path.parent) if cfg_path is not None else "mock"
        self.max_model_len = max_model_len or context
        self.model_config = _Info(vocab_size=vocab_size)
        self.config = _Info(max_logprobs=max_logprobs)
        self.tokenizer = None  # the API process then takes token-id prompts only
        self.max_num_seqs = max_num_seqs
        self.max_waiting_requests = max_waiting_requests
        if num_pages is None:
            num_pages = max_num_seqs * math.ceil(self.max_model_len / page_size)
        self.pages = _Pages(num_pages, page_size)
        self.scheduler = _Scheduler()
        self.slots = _Slots(max_num_seqs, self.scheduler)
        self.stats = {"steps": 0, "graph_steps": 0, "mixed_graph_steps": 0, "failed_requests": 0}
        self._groups: dict[str, _Group] = {}
        self._seqs: dict[str, tuple[_Group, int]] = {}  # completion id -> (group, index)
        self._next_tick = 0.0
        # The engine's checks (graphrt.validation); n is left to the queue, as its tests want
        # a burst of completions to overload it.
        self.request_limits = RequestLimits(
            vocab_size=vocab_size,
            max_model_len=self.max_model_len,
            max_logprobs=max_logprobs,
            max_n=max_num_seqs,
            max_n_setting="max_num_seqs",
        )

    def add_core_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,  # the mock caches nothing
        prompt: str | None = None,
    ) -> list[str]:
        if request_id in self._groups:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        limits = self.request_limits
        check_prompt(prompt_ids, limits)
        max_len = check_max_tokens(len(prompt_ids), params.max_tokens, limits)
        check_logprobs(params.logprobs, limits)
        max_tokens = max_len - len(prompt_ids)
        waiting = sum(g.params.n for g in self.scheduler.waiting)
        if waiting + params.n > self.max_waiting_requests:
            raise EngineOverloaded(f"{waiting} requests already waiting; retry later")
        seq_ids = completion_ids(request_id, params.n)
        group = _Group(request_id, list(prompt_ids), params, max_tokens, [0] * params.n)
        group.seq_ids = seq_ids
        self._groups[request_id] = group
        for i, sid in enumerate(seq_ids):
            self._seqs[sid] = (group, i)
        self.scheduler.waiting.append(group)
        return seq_ids

    def end_sequence(self, seq_id: str, reason: Any, error: str | None = None) -> bool:
        """The API side ended a completion (a stop string): no more tokens for it."""
        entry = self._seqs.get(seq_id)
        if entry is None:
            return False
        g, i = entry
        if g.generated[i] >= g.max_tokens:
            return False
        g.generated[i] = g.max_tokens
        self._seqs.pop(seq_id, None)
        if all(done >= g.max_tokens for done in g.generated):
            self._groups.pop(g.request_id, None)
            self._release(g)
        return True

    def abort(self, request_id: str) -> bool:
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        for sid in group.seq_ids:
            self._seqs.pop(sid, None)
        self._release(group)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    def kv_usage(self) -> float:
        return self.pages.num_used / self.pages.num_usable

    def shutdown(self) -> None:
        for rid in list(self._groups):
            self.abort(rid)

    def core_step(self) -> StepTokens:
        """Wait for the next tick of the step clock, then give every running completion one
        token. A late tick is not made up for with a burst: the clock restarts from now."""
        now = time.perf_counter()
        if self._next_tick > now:
            time.sleep(self._next_tick - now)
            now = self._next_tick
        self._next_tick = now + self.step_s
        self._admit()
        sched = self.scheduler
        self.stats["steps"] += bool(sched.running)
        step = StepTokens(self.stats["steps"])
        k = max((g.params.logprobs or 0 for g in sched.running), default=0)
        if any(g.params.logprobs is not None for g in sched.running):
            step.logprobs, step.top_ids, step.top_logprobs = [], [], []
        still = []
        for g in sched.running:
            for i, done in enumerate(g.generated):
                if done >= g.max_tokens:
                    continue
                pos = len(g.prompt_ids) + done
                tid = (pos * 7919 + i) % self.model_config.vocab_size
                step.seq_ids.append(g.seq_ids[i])
                step.ids.append(tid)
                if step.logprobs is not None:
                    step.logprobs.append(-1.0)
                    step.top_ids.append([tid] * k)
                    step.top_logprobs.append([-1.0] * k)
                g.generated[i] = done = done + 1
                if done >= g.max_tokens:
                    step.finished[g.seq_ids[i]] = CoreFinish(FinishReason.LENGTH)
                    self._seqs.pop(g.seq_ids[i], None)
            self._grow(g)
            if all(done >= g.max_tokens for done in g.generated):
                self._groups.pop(g.request_id, None)
                self._release(g, running=False)
            else:
                still.append(g)
        sched.running = still
        return step

    # ---- internals ----------------------------------------------------------------------------
    def _admit(self) -> None:
        sched = self.scheduler
        seqs = sum(g.params.n for g in sched.running)
        while sched.waiting and seqs + sched.waiting[0].params.n <= self.max_num_seqs:
            g = sched.waiting.pop(0)
            sched.running.append(g)
            seqs += g.params.n

    def _grow(self, g: _Group) -> None:
        ps = self.pages.page_size
        need = sum(math.ceil((len(g.prompt_ids) + k) / ps) for k in g.generated)
        self.pages.num_free -= need - g.pages
        g.pages = need

    def _release(self, g: _Group, running: bool | None = None) -> None:
        self.pages.num_free += g.pages
        g.pages = 0
        sched = self.scheduler
        if running is not False and g in sched.running:
            sched.running.remove(g)
        if g in sched.waiting:
            sched.waiting.remove(g)
