"""The prefix cache: its index and the allocator's reference counts (pure Python), the
scheduler's use of them through the fake device of ``test_scheduler`` (which checks the KV of
every position each step reads), and the peer bugs the one-step-ahead loop must make impossible.
Engine-level equality with the cache off is in ``test_prefix_cache_engine.py``."""

from __future__ import annotations

import pytest
from test_scheduler import Sim, _tok

from graphrt.memory.page_allocator import PageAllocator
from graphrt.memory.prefix_cache import PrefixIndex
from graphrt.request import RequestStatus

PS = 4
SYSTEM = [900 + i for i in range(12)]  # three full pages of PS tokens


def _prompt(k: int, n: int, prefix: list[int] = SYSTEM) -> list[int]:
    return prefix + [_tok(k, p) for p in range(len(prefix), n)]


# ---- the index ----------------------------------------------------------------------------
def test_index_matches_whole_pages_in_order_and_exactly() -> None:
    idx = PrefixIndex(page_size=2)
    a = idx.insert(None, [1, 2], page=5)
    b = idx.insert(a, [3, 4], page=6)
    assert idx.match([1, 2, 3, 4, 5], max_pages=2) == ([5, 6], b)
    assert idx.match([1, 2, 3, 4], max_pages=1) == ([5], a)
    assert idx.match([1, 2, 3, 9], max_pages=2) == ([5], a)  # the second page differs
    assert idx.match([3, 4], max_pages=1) == ([], None)  # a page is found only after its prefix
    assert idx.match([1, 2, 3, 4], max_pages=2, salt="tenant") == ([], "tenant")
    assert len(idx) == 2 and 5 in idx and 7 not in idx


def test_index_keeps_the_first_of_equal_pages() -> None:
    idx = PrefixIndex(page_size=2)
    first = idx.insert(None, [1, 2], page=5)
    assert idx.insert(None, [1, 2], page=8) == first  # 8 stays private
    assert 8 not in idx
    idx.remove(5)
    assert idx.match([1, 2], 1) == ([], None)
    # The page's id is reused for other tokens: its old children are never reached through it.
    child = idx.insert(first, [3, 4], page=6)
    fresh = idx.insert(None, [7, 7], page=5)
    assert fresh != first and idx.match([7, 7, 3, 4], 2) == ([5], fresh)
    assert child not in (fresh,)


# ---- the allocator ------------------------------------------------------------------------
def _cached_allocator(num_pages: int = 6) -> PageAllocator:
    return PageAllocator(num_pages, page_size=2, prefix_caching=True)


def test_released_indexed_pages_stay_cached_and_count_as_free() -> None:
    pool = _cached_allocator()  # 5 usable
    pages = pool.allocate(3)
    node = pool.index.insert(None, [1, 2], pages[0])
    pool.index.insert(node, [3, 4], pages[1])
    pool.free(pages)
    pool.check()
    assert (pool.num_used, pool.num_cached, pool.num_free) == (0, 2, 5)
    hit, _ = pool.index.match([1, 2, 3, 4, 5], 2)
    assert hit == pages[:2]
    assert pool.can_acquire_and_allocate(hit, 3) and not pool.can_acquire_and_allocate(hit, 4)
    pool.acquire(hit)
    assert (pool.num_used, pool.num_cached, pool.num_free) == (2, 0, 3)
    pool.acquire(hit)  # a second holder
    assert pool.refcount(hit[0]) == 2
    pool.free(hit)
    assert pool.num_used == 2
    pool.free(hit)
    pool.check()
    assert pool.num_cached == 2


def test_allocation_evicts_least_recently_released_later_pages_first() -> None:
    pool = _cached_allocator(num_pages=5)  # 4 usable
    a = pool.allocate(2)
    na = pool.index.insert(None, [1, 1], a[0])
    pool.index.insert(na, [2, 2], a[1])
    b = pool.allocate(2)
    pool.index.insert(None, [3, 3], b[0])
    pool.free(a)  # a's second page is the first to go, then its first
    pool.free(b)  # b[1] was never indexed: it is free, not cached
    assert pool.num_cached == 3 and len(pool._free) == 1
    assert pool.allocate(1) == [b[1]]
    assert pool.allocate(1) == [a[1]] and pool.num_evicted == 1
    assert pool.index.match([1, 1, 2, 2], 2)[0] == [a[0]]
    assert sorted(pool.allocate(2)) == sorted([a[0], b[0]])
    assert len(pool.index) == 0 and pool.num_evicted == 3
    pool.check()
    with pytest.raises(MemoryError):
        pool.allocate(1)


def test_sharing_or_freeing_a_page_nobody_holds_raises() -> None:
    pool = _cached_allocator()
    with pytest.raises(ValueError, match="neither held nor cached"):
        pool.acquire([1])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([1])
    (page,) = pool.allocate(1)
    pool.free([page])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([page])


# ---- the scheduler, through the fake device -----------------------------------------------
def test_shared_prompt_hits_full_pages_and_computes_the_rest() -> None:
    sim = Sim(page_size=PS, prefix_caching=True)
    a = sim.add("a", 14, 3, prompt=_prompt(0, 14))
    sim.run()
    b = sim.add("b", 18, 3, prompt=_prompt(1, 18))
    plan, _ = sim.schedule_and_launch()
    # Three full pages of the system prompt came from a; b computes positions 12..17.
    assert plan.requests == [b] and plan.positions.tolist() == list(range(12, 18))
    assert b.pages[:3] == sim.table_of["a"][:3]
    assert b.num_cached_tokens == 12
    assert sim.sched.prefix_queries == 14 + 18 and sim.sched.prefix_hits == 12
    sim.process(plan, _)
    sim.run()
    sim.check_done()
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 12  # unchanged at finish


def test_pages_are_shared_as_soon_as_a_prefill_completes() -> None:
    # a is still decoding (max_tokens 20) when b arrives: b shares a's prompt pages, held by
    # both, and never writes them.
    sim = Sim(page_size=PS, prefix_caching=True, overlap=True, deferred=True)
    a = sim.add("a", 13, 20, prompt=_prompt(0, 13))
    for _ in range(3):
        sim.step()
    assert a.status is RequestStatus.RUNNING and not a.finished
    b = sim.add("b", 13, 2, prompt=_prompt(1, 13))
    sim.step()
    assert b.num_cached_tokens == 12 and b.pages[:3] == a.pages[:3]
    assert all(sim.pages.refcount(p) == 2 for p in a.pages[:3])
    sim.run()
    sim.check_done()


def test_fully_cached_prompt_recomputes_its_last_page() -> None:
    # SGLang #38140: a prompt cached whole must still compute its last token. Only pages before
    # the last token are shared, so that token and its page are the new request's own: no step
    # ever writes a page that another request's step reads.
    sim = Sim(page_size=PS, prefix_caching=True, overlap=True, deferred=True)
    prompt = _prompt(0, 12)
    sim.add("a", 12, 2, prompt=prompt)
    sim.run()
    b = sim.add("b", 12, 2, prompt=prompt)
    sim.step()
    plan = sim.plans[-1]
    assert b.num_cached_tokens == 8
    assert plan.positions.tolist() == [8, 9, 10, 11] and plan.samples.tolist() == [True]
    sim.run()  # the fake device checks every write (private pages only) and every read
    sim.check_done()


def test_pages_are_indexed_only_after_the_step_that_writes_them() -> None:
    # vLLM #41400/#43569: pages registered before the step that writes them ran kept pointing at
    # garbage when their request went away first. Here a's prefill step is launched, a is
    # aborted before that step is processed, and its pages go back unindexed.
    sim = Sim(page_size=PS, prefix_caching=True, overlap=True, deferred=True)
    a = sim.add("a", 13, 4, prompt=_prompt(0, 13))
    first = sim.schedule_and_launch()
    assert first is not None and len(sim.pages.index) == 0
    sim.abort(a)
    sim.process(*first)  # the step ran; its pages were already freed, so none is indexed
    assert len(sim.pages.index) == 0 and sim.pages.num_cached == 0
    b = sim.add("b", 13, 2, prompt=_prompt(1, 13))
    sim.run()
    sim.check_done()
    assert b.num_cached_tokens == 0


def test_preempted_prefill_is_not_indexed_and_not_readmitted_while_in_flight() -> None:
    # A chunk of x's prompt is in flight when x is preempted: x waits until that step has been
    # processed, so the step's writes can never be mistaken for x's new pages.
    sim = Sim(num_pages=11, page_size=1, budget=6, overlap=True, prefix_caching=True)
    a = sim.add("a", 2, 2)
    x = sim.add("x", 8, 1)
    s1 = sim.schedule_and_launch()
    s2 = sim.schedule_and_launch()
    sim.process(*s1)
    assert sim.schedule_and_launch() is None and x.in_flight and x.num_preemptions == 1
    sim.process(*s2)
    assert a.finished and not x.in_flight
    sim.inflight = sim.schedule_and_launch()
    sim.run()
    sim.check_done()


@pytest.mark.parametrize("cache", [False, True], ids=["cache-off", "cache-on"])
def test_pages_freed_at_step_n_are_reused_only_after_step_n_plus_1_reads_them(cache) -> None:
    # vLLM #45357: a request that finishes while processing step n is also in step n+1, which
    # is launched and still reads its pages. A tight pool makes the next admission reuse (or
    # evict) them at once; the device, one step behind, checks n+1's reads when it runs.
    sim = Sim(num_pages=5, page_size=PS, overlap=True, deferred=True, prefix_caching=cache)
    a = sim.add("a", 9, 3, target=1, prompt=_prompt(0, 9, SYSTEM[:8]))
    sim.step()  # launches a's prefill
    sim.step()  # launches a's extra decode step, then processes the prefill: a finishes
    assert a.finished and sim.inflight is not None and a in sim.inflight[0].requests
    b = sim.add("b", 13, 3, prompt=[_tok(1, p) for p in range(13)])  # needs every page
    sim.step()
    assert sim.plans[-1].requests == [b] and sorted(b.pages) == [1, 2, 3, 4]
    sim.run()
    sim.check_done()
    if cache:
        assert sim.pages.num_evicted == 2  # a's two indexed prompt pages went to b


def test_cached_tokens_stay_those_of_the_first_admission() -> None:
    # SGLang #24590/#24745: the count reported at finish was off by one. It is the number of
    # prompt tokens found at the first admission, in whole pages, whatever happens later.
    sim = Sim(num_pages=9, page_size=PS, prefix_caching=True, max_num_seqs=4)
    sim.add("a", 13, 2, prompt=_prompt(0, 13))
    sim.run()
    b = sim.add("b", 13, 16, prompt=_prompt(1, 13))
    c = sim.add("c", 5, 16, prompt=[_tok(2, p) for p in range(5)])
    sim.run()
    sim.check_done()
    assert sim.sched.num_preemptions > 0
    assert b.num_cached_tokens == 12 and c.num_cached_tokens == 0


def test_n_siblings_share_the_first_completions_prompt_pages() -> None:
    sim = Sim(page_size=PS, prefix_caching=True, overlap=True, deferred=True, budget=8)
    prompt = _prompt(0, 14)
    sim.add("g#0", 14, 3, prompt=prompt)
    kids = [sim.add(f"g#{i}", 14, 3, prompt=prompt) for i in (1, 2)]
    sim.step()
    assert [r.status for r in kids] == [RequestStatus.WAITING] * 2  # the prompt is not in yet
    sim.run()
    sim.check_done()
    assert [r.num_cached_tokens for r in kids] == [12, 12]
    # Each sibling prefilled only positions 12 and 13 of the prompt.
    for kid in kids:
        fed = [
            pos
            for p in sim.plans
            if kid in p.requests
            for i in [p.requests.index(kid)]
            if p.input_ids[int(p.query_lens[:i].sum())] != -1
            for pos in range(int(p.seq_lens[i] - p.query_lens[i]), int(p.seq_lens[i]))
        ]
        assert fed == [12, 13]
    assert sim.sched.prefix_hits == 24


def test_salted_requests_share_nothing_across_salts() -> None:
    sim = Sim(page_size=PS, prefix_caching=True)
    sim.add("a", 13, 2, prompt=_prompt(0, 13), cache_salt="tenant-a")
    sim.run()
    other = sim.add("b", 13, 2, prompt=_prompt(1, 13), cache_salt="tenant-b")
    same = sim.add("c", 13, 2, prompt=_prompt(2, 13), cache_salt="tenant-a")
    plain = sim.add("d", 13, 2, prompt=_prompt(3, 13))
    sim.run()
    sim.check_done()
    assert (other.num_cached_tokens, same.num_cached_tokens, plain.num_cached_tokens) == (0, 12, 0)


def test_prefix_cache_off_indexes_nothing() -> None:
    sim = Sim(page_size=PS)
    sim.add("a", 13, 2, prompt=_prompt(0, 13))
    sim.run()
    b = sim.add("b", 13, 2, prompt=_prompt(1, 13))
    sim.run()
    sim.check_done()
    assert sim.pages.index is None and b.num_cached_tokens is None
    assert sim.sched.prefix_queries == sim.sched.prefix_hits == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_a_burst_with_one_system_prompt_prefills_it_once(overlap: bool) -> None:
    # Four requests arrive together. The first prefills the system prompt over two steps; the
    # others wait until its pages are indexed (a step later, one step behind), then share them.
    sim = Sim(page_size=PS, prefix_caching=True, overlap=overlap, deferred=overlap, budget=8)
    reqs = [sim.add(f"r{k}", 16, 2, prompt=_prompt(k, 16)) for k in range(4)]
    sim.run()
    sim.check_done()
    assert [r.num_cached_tokens for r in reqs] == [0, 12, 12, 12]
    assert sim.sched.prefix_hits == 36
    # The system prompt's positions were computed once.
    fed = sum(int((p.input_ids != -1).sum()) for p in sim.plans)  # prompt tokens fed
    assert fed == 16 + 3 * 4


def test_a_waiting_request_never_waits_on_another_tenant() -> None:
    sim = Sim(page_size=PS, prefix_caching=True, budget=32)
    sim.add("a", 16, 2, prompt=_prompt(0, 16), cache_salt="x")
    b = sim.add("b", 16, 2, prompt=_prompt(1, 16), cache_salt="y")
    sim.step()
    assert b.status is RequestStatus.RUNNING  # admitted with a at once: nothing to share
    sim.run()
    sim.check_done()
    assert b.num_cached_tokens == 0
