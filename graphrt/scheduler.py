"""Continuous batching: admission, chunked prefill, preemption. Pure Python, no device work.

Each step holds every running request that has finished its prefill (one decode token each),
then continues unfinished prefills, then admits waiting requests, all within a token budget.
With ``admission_interval`` N > 1, a step that has decode rows admits only once waiting
requests have been admissible (a slot free) for N steps: a step with a prefill chunk runs
eagerly, with its whole CPU launch cost, so fewer and larger ones raise throughput.
When a decode row needs a page and none is free, the newest running request is preempted: its
pages and slot are freed and it goes back to the front of the queue, to be recomputed from its
prompt and outputs so far.

The scheduler plans one step ahead of the results it has seen. Positions and page needs are
known from what has been *launched* (``num_computed``, ``num_pending``), so a request's next
decode is planned before its previous token reaches the host.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from graphrt.errors import EngineOverloaded
from graphrt.memory.page_allocator import DUMMY_SLOT, PageAllocator, SlotAllocator
from graphrt.memory.prefix_cache import PrefixIndex
from graphrt.request import Request, RequestStatus
from graphrt.step_plan import GREEDY_NEEDS, SamplerNeeds, SlotInit, StepPlan


class Scheduler:
    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting_requests: int,
        pages: PageAllocator,
        slots: SlotAllocator,
        slot_init: Callable[[Request, int], SlotInit],
        admission_interval: int = 1,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.admission_interval = admission_interval
        self._held = 0  # consecutive steps that held back admissible waiting requests
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting_requests = max_waiting_requests
        self.pages = pages
        self.slots = slots
        self._slot_init = slot_init
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._next_step = 0
        self.num_preemptions = 0
        # Prefix cache, in prompt tokens (vLLM's prefix_cache_queries and _hits): looked up at
        # admissions, and found in the cache.
        self.prefix_queries = 0
        self.prefix_hits = 0
        # Running requests with full prefill pages launched or to come that are not indexed yet:
        # a waiting request that would share them waits for them (_shares_a_prefill_in_flight).
        self._filling: list[Request] = []

    # ---- queue ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting_requests:
            raise EngineOverloaded(
                f"{len(self.waiting)} requests already waiting (max_waiting_requests="
                f"{self.max_waiting_requests}); retry later"
            )
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request and free what it holds.

        Safe while a launched step still uses its pages or slot: the next step that reuses them
        runs after it on the same stream.
        """
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = RequestStatus.FINISHED

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- planning ------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step, or None when nothing can run now."""
        b = _PlanBuilder()
        budget = self.max_num_batched_tokens
        ps = self.pages.page_size
        running = RequestStatus.RUNNING
        # The decode loop runs for every running request every step (at 256 rows it is a
        # quarter of the CPU time a 1B model's 2 ms step leaves): keep it flat. Each decode row
        # feeds the token at position nc (already on the GPU) and samples the next one.
        rows, slots, seq_lens, extra = b.rows, b.slots, b.seq_lens, b.extra_needs
        greedy = GREEDY_NEEDS
        prefilling: list[Request] = []  # running requests with prefill left, in running order
        last_extra = greedy
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not running:
                continue  # preempted by a row before it in this loop
            nc = req.num_computed
            if nc < len(req.prefill_ids):
                prefilling.append(req)
                continue
            # Past its prefill, a running request has launched every position before nc and one
            # sampled token per position from its prompt's end on, so prompt + outputs + in-flight
            # tokens == nc + 1; when that reaches max_len its last token has been launched.
            if nc + 1 >= req.max_len:
                continue
            if nc // ps >= len(req.pages) and not self._reserve_pages(req, nc + 1, b, True):
                continue  # preempted itself
            rows.append(req)
            slots.append(req.slot)
            nc += 1
            seq_lens.append(nc)
            req.num_computed = nc
            req.num_pending += 1
            needs = req.needs
            if needs is not greedy and needs is not last_extra:
                extra.append(needs)  # instances are shared, so runs of one kind append once
                last_extra = needs
            budget -= 1
        for req in prefilling:
            if budget == 0:
                break
            if req.status is not running or req.prefill_done:
                continue
            budget -= self._schedule_prefill_chunk(req, budget, b)
        admissible = bool(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs
        if admissible and rows and not b.prefills and self._held + 1 < self.admission_interval:
            # Only decode rows so far: holding the queue back keeps this step a graph replay.
            # A step that already carries a prefill chunk is eager anyway, so it admits.
            self._held += 1
            admissible = False
        elif not admissible:
            self._held = 0
        while admissible and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.in_flight:
                break  # a preempted request whose last step has not been processed yet
            if not self._admit(req, budget, b):
                break
            budget -= b.last_chunk
            self._held = 0
        if not b.rows:
            return None
        plan = b.build(self._next_step)
        self._next_step += 1
        return plan

    def _admit(self, req: Request, budget: int, b: _PlanBuilder) -> bool:
        """Admit the head of the queue, or return False to keep it (and the rest) waiting."""
        if req.num_preemptions:
            req.prefill_ids = req.prompt_ids + req.output_ids
        ids, ps, index = req.prefill_ids, self.pages.page_size, self.pages.index
        hit: list[int] = []
        parent = req.cache_salt
        if index is not None:
            # At least the last token is computed, for its logits: only pages before it match.
            max_pages = (len(ids) - 1) // ps
            hit, parent = index.match(ids, max_pages, req.cache_salt)
            if len(hit) < max_pages and self._shares_a_prefill_in_flight(req, len(hit), parent):
                return False
        start = len(hit) * ps
        chunk = min(len(ids) - start, budget)
        need = self.pages.pages_for(start + chunk) - len(hit)
        if not self.pages.can_acquire_and_allocate(hit, need) or not self.slots.can_allocate(1):
            return False
        self.waiting.popleft()
        req.slot = self.slots.allocate_one()
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        b.slot_inits.append(self._slot_init(req, req.slot))
        if index is not None:
            self.prefix_queries += len(ids)
            self.prefix_hits += start
            if req.num_cached_tokens is None:
                req.num_cached_tokens = start
            self.pages.acquire(hit)
            req.pages = hit
            req.num_indexed_pages, req.cache_parent = len(hit), parent
            for i, page in enumerate(hit):
                b.page_updates.append((req.slot, i, page))
            if len(ids) // ps > len(hit):
                self._filling.append(req)
        req.num_computed = start
        self._reserve_pages(req, start + chunk, b, preempt=False)
        b.prefill_row(req, chunk)
        return True

    def _shares_a_prefill_in_flight(self, req: Request, matched: int, parent: object) -> bool:
        """Whether a running request is filling, or is about to fill, the page that would
        extend ``req``'s match of ``matched`` pages under index node ``parent``. Then ``req``
        waits a step or two and shares that page (and those after it) instead of computing its
        own copy: the later completions of an ``n > 1`` request, and a burst of requests with
        one system prompt, prefill it once (SGLang's in-batch prefix caching does the same)."""
        ps = self.pages.page_size
        lo, hi = matched * ps, (matched + 1) * ps
        page = req.prefill_ids[lo:hi]
        for r in self._filling:
            if (
                r.cache_parent == parent
                and r.num_indexed_pages == matched
                and r.prefill_ids[lo:hi] == page
            ):
                return True
        return False

    def step_done(self, plan: StepPlan) -> None:
        """Bookkeeping once ``plan``'s step has finished on the device and before its ids are
        processed: its prefill chunks are no longer in flight, and the pages its rows filled
        join the prefix index (only now: their KV is written, so a later step that finds them
        reads what a recompute would produce)."""
        index = self.pages.index
        running = RequestStatus.RUNNING
        if not plan.is_decode:
            seq_lens, samples = plan.seq_lens.tolist(), plan.samples.tolist()
            for r, req in enumerate(plan.requests):
                if not samples[r]:
                    req.num_chunks_pending -= 1
                if index is not None and req.status is running:
                    self._index_pages(index, req, seq_lens[r])
            return
        if index is None:
            return
        # A decode row fills a page only every page_size steps: find those rows in one go.
        ps = self.pages.page_size
        for r in np.flatnonzero(plan.seq_lens % ps == 0).tolist():
            req = plan.requests[r]
            if req.status is running:
                self._index_pages(index, req, int(plan.seq_lens[r]))

    def _index_pages(self, index: PrefixIndex, req: Request, num_tokens: int) -> None:
        """Index ``req``'s full pages among its first ``num_tokens`` positions."""
        ps = self.pages.page_size
        full = min(num_tokens // ps, len(req.pages))
        if full <= req.num_indexed_pages:
            return
        parent = req.cache_parent
        for i in range(req.num_indexed_pages, full):
            parent = index.insert(parent, req.token_ids(i * ps, (i + 1) * ps), req.pages[i])
        req.num_indexed_pages, req.cache_parent = full, parent
        if full >= len(req.prefill_ids) // ps and req in self._filling:
            self._filling.remove(req)

    def _schedule_prefill_chunk(self, req: Request, budget: int, b: _PlanBuilder) -> int:
        remaining = len(req.prefill_ids) - req.num_computed
        chunk = min(remaining, budget)
        ps = self.pages.page_size
        fits = (len(req.pages) + self.pages.num_free) * ps - req.num_computed
        if fits <= 0:
            if b.rows:
                return 0  # other rows make progress this step and will free pages
            # Nothing else can run: take pages from newer requests, so half-prefilled prompts
            # cannot deadlock each other. The plan is empty, so no victim is in it.
            if not self._reserve_pages(req, req.num_computed + 1, b, preempt=True):
                return 0
            fits = (len(req.pages) + self.pages.num_free) * ps - req.num_computed
        chunk = min(chunk, fits)
        self._reserve_pages(req, req.num_computed + chunk, b, preempt=False)
        b.prefill_row(req, chunk)
        return chunk

    def _reserve_pages(self, req: Request, num_tokens: int, b: _PlanBuilder, preempt: bool) -> bool:
        """Give ``req`` pages for ``num_tokens`` positions, preempting newer requests if allowed.

        Returns False if ``req`` itself had to be preempted.
        """
        need = self.pages.pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        while not self.pages.can_allocate(need):
            if not preempt:
                return False
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        new = self.pages.allocate(need)
        first = len(req.pages)
        req.pages.extend(new)
        for i, page in enumerate(new):
            b.page_updates.append((req.slot, first + i, page))
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        if req.pages:
            self.pages.free(req.pages)
            req.pages = []
            req.num_indexed_pages = 0
        if req in self._filling:
            self._filling.remove(req)
        if req.slot is not None:
            self.slots.free([req.slot])
            req.slot = None


class _PlanBuilder:
    """Accumulates rows for one plan, then packs them into numpy arrays."""

    def __init__(self) -> None:
        self.rows: list[Request] = []
        self.slots: list[int] = []
        self.seq_lens: list[int] = []
        self.prefills: list[tuple[int, int, bool]] = []  # (row, start, n, ...) of prefill rows
        self.page_updates: list[tuple[int, int, int]] = []
        self.slot_inits: list[SlotInit] = []
        self.extra_needs: list[SamplerNeeds] = []  # needs of sampling rows beyond greedy
        self.last_chunk = 0

    def prefill_row(self, req: Request, n: int) -> None:
        start = req.num_computed
        req.num_computed += n
        samples = req.prefill_done
        self.prefills.append((len(self.rows), start, n))
        self.rows.append(req)
        self.slots.append(req.slot)
        self.seq_lens.append(start + n)
        self.last_chunk = n
        if samples:
            req.num_pending += 1
            if req.needs is not GREEDY_NEEDS:
                self.extra_needs.append(req.needs)
        else:
            req.num_chunks_pending += 1

    def build(self, step_id: int) -> StepPlan:
        i64 = np.int64
        b = len(self.rows)
        slots = np.array(self.slots, dtype=i64)
        seq_lens = np.array(self.seq_lens, dtype=i64)
        if not self.prefills:
            samples = np.ones(b, dtype=bool)
            query_lens = np.ones(b, dtype=i64)
            input_ids = np.full(b, -1, dtype=i64)
            positions = seq_lens - 1
            out_slots = slots
        else:
            samples = np.ones(b, dtype=bool)
            query_lens = np.ones(b, dtype=i64)
            ids_parts: list[list[int]] = []
            pos_parts: list = []
            pre = {row: (start, n) for row, start, n in self.prefills}
            for r, req in enumerate(self.rows):
                if r in pre:
                    start, n = pre[r]
                    query_lens[r] = n
                    samples[r] = start + n >= len(req.prefill_ids)
                    ids_parts.append(req.prefill_ids[start : start + n])
                    pos_parts.append(np.arange(start, start + n, dtype=i64))
                else:
                    ids_parts.append([-1])
                    pos_parts.append(np.array([self.seq_lens[r] - 1], dtype=i64))
            input_ids = np.fromiter(
                (t for part in ids_parts for t in part), dtype=i64, count=int(query_lens.sum())
            )
            positions = np.concatenate(pos_parts)
            out_slots = np.where(samples, slots, DUMMY_SLOT)
        needs = GREEDY_NEEDS
        for n in self.extra_needs:
            needs = needs | n
        updates = np.array(self.page_updates, dtype=i64).reshape(-1, 3).T.copy()
        return StepPlan(
            step_id=step_id,
            is_decode=not self.prefills,
            requests=self.rows,
            samples=samples,
            slots=slots,
            out_slots=out_slots,
            seq_lens=seq_lens,
            query_lens=query_lens,
            input_ids=input_ids,
            positions=positions,
            page_updates=updates,
            slot_inits=self.slot_inits,
            needs=needs,
        )
