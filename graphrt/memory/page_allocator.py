"""Free lists for KV pages and request slots. Pure Python: no device work here."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from graphrt.memory.prefix_cache import PrefixIndex

# Id 0 of both pools is reserved as the dummy that padded rows of a decode graph point at:
# their KV writes land in page 0 and their sampled ids in slot 0, which no request ever owns.
DUMMY_PAGE = 0
DUMMY_SLOT = 0

_ABSENT = object()


class IdPool:
    """A LIFO free list over ids ``[1, capacity)``; id 0 is the reserved dummy.

    Freeing an id that is not allocated raises, so double frees are caught where they happen.
    """

    def __init__(self, capacity: int, what: str) -> None:
        if capacity < 2:
            raise ValueError(
                f"{what} pool needs at least 2 entries (one is the dummy), got {capacity}"
            )
        self.capacity = capacity
        self.what = what
        # Low ids on top of the stack, so a fresh pool hands out 1, 2, 3, ...
        self._free = list(range(capacity - 1, 0, -1))
        self._used = bytearray(capacity)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """Ids a request can ever hold: everything but the dummy."""
        return self.capacity - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` ids; raises ``MemoryError`` if fewer are free (callers check first)."""
        if n < 0:
            # self._free[-n:] would silently hand out all but n ids.
            raise ValueError(f"asked for a negative number of {self.what}s: {n}")
        if n > len(self._free):
            raise MemoryError(f"asked for {n} {self.what}s, {len(self._free)} free")
        if n == 0:
            return []
        ids = self._free[-n:]
        del self._free[-n:]
        ids.reverse()
        for i in ids:
            self._used[i] = 1
        return ids

    def allocate_one(self) -> int:
        return self.allocate(1)[0]

    def free(self, ids: Iterable[int]) -> None:
        for i in ids:
            if not 0 < i < self.capacity or not self._used[i]:
                raise ValueError(f"freeing {self.what} {i}, which is not allocated")
            self._used[i] = 0
            self._free.append(i)


class PageAllocator(IdPool):
    """KV pages of ``page_size`` tokens each, with reference counts and, optionally, a prefix
    cache.

    A page is in one of three states, and ``free + cached + used == usable`` always holds
    (:meth:`check`):

    * **free**: on the free list, holding nothing anyone can find;
    * **used**: held by at least one request (``refcount > 0``); shared prefix pages have more;
    * **cached**: held by no request but still in the prefix index, so a later request with the
      same prefix can take it back (:meth:`acquire`). Cached pages count as free for
      :meth:`can_allocate` and :attr:`num_free`: :meth:`allocate` evicts them, least recently
      released first, once the free list is empty.

    Without a prefix cache nothing is ever indexed, and this is a plain free list.
    """

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = False) -> None:
        super().__init__(num_pages, "page")
        self.page_size = page_size
        self.index = PrefixIndex(page_size) if prefix_caching else None
        self._refs = [0] * num_pages
        # Cached pages, least recently released first: eviction pops from the front.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.num_evicted = 0  # cached pages reused for something else, since the start

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.page_size)

    @property
    def num_free(self) -> int:
        """Pages :meth:`allocate` can hand out: free ones and cached ones it would evict."""
        return len(self._free) + len(self._lru)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.num_free

    @property
    def num_cached(self) -> int:
        """Pages held by no request but kept in the prefix index."""
        return len(self._lru)

    @property
    def num_used(self) -> int:
        """Pages held by at least one request."""
        return self.num_usable - len(self._free) - len(self._lru)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` pages, each with one reference, evicting cached pages if the free list runs
        short; raises ``MemoryError`` if fewer than ``n`` are free or cached (callers check)."""
        short = n - len(self._free)
        if short > 0 and short <= len(self._lru):
            self.num_evicted += short
            for _ in range(short):
                page, _ = self._lru.popitem(last=False)
                self.index.remove(page)  # type: ignore[union-attr]  # only indexed pages cache
                self._used[page] = 0
                self._free.append(page)
        ids = super().allocate(n)
        refs = self._refs
        for i in ids:
            refs[i] = 1
        return ids

    def acquire(self, pages: list[int]) -> None:
        """Take one more reference to each of ``pages`` (indexed pages a prefix match found)."""
        refs, lru = self._refs, self._lru
        for page in pages:
            if refs[page] == 0 and lru.pop(page, _ABSENT) is _ABSENT:
                raise ValueError(f"sharing page {page}, which is neither held nor cached")
            refs[page] += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference to each of ``ids``, one request's pages in order. A page nobody
        holds goes back to the free list, or, if the prefix index knows it, to the cache,
        where the request's later pages are evicted before its earlier ones (a later page is
        useless without those before it)."""
        refs, index, lru = self._refs, self.index, self._lru
        for page in reversed(ids):
            if not 0 < page < self.capacity or refs[page] == 0:
                raise ValueError(f"freeing page {page}, which is not allocated")
            refs[page] -= 1
            if refs[page]:
                continue
            if index is not None and page in index:
                lru[page] = None
            else:
                self._used[page] = 0
                self._free.append(page)

    def can_acquire_and_allocate(self, shared: list[int], n: int) -> bool:
        """Whether :meth:`acquire` of ``shared`` and then :meth:`allocate` of ``n`` would both
        succeed: taking back a cached page leaves one fewer to evict."""
        refs = self._refs
        reclaimed = sum(1 for page in shared if refs[page] == 0)
        return 0 <= n <= self.num_free - reclaimed

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def check(self) -> None:
        """Assert the accounting: every usable page is exactly one of free, cached or used."""
        refs = self._refs
        free, cached = set(self._free), set(self._lru)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & cached, "a page is both free and cached"
        used = {p for p in range(1, self.capacity) if refs[p] > 0}
        assert not used & (free | cached), "a held page is free or cached"
        assert len(free) + len(cached) + len(used) == self.num_usable, "a page is lost"
        assert refs[DUMMY_PAGE] == 0, "the dummy page is held"
        if self.index is not None:
            assert all(p in self.index for p in cached), "a cached page is not indexed"
            assert not any(p in self.index for p in free), "a free page is still indexed"


class SlotAllocator(IdPool):
    """Request slots: rows of the slot-indexed device state (token buffer, page table, sampling
    parameters). A running request holds one slot."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots, "slot")
