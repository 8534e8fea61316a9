"""Free lists for KV pages and request slots. Pure Python: no device work here."""

from __future__ import annotations

from collections.abc import Iterable

# Id 0 of both pools is reserved as the dummy that padded rows of a decode graph point at:
# their KV writes land in page 0 and their sampled ids in slot 0, which no request ever owns.
DUMMY_PAGE = 0
DUMMY_SLOT = 0


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
    """KV pages of ``page_size`` tokens each."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        super().__init__(num_pages, "page")
        self.page_size = page_size

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.page_size)


class SlotAllocator(IdPool):
    """Request slots: rows of the slot-indexed device state (token buffer, page table, sampling
    parameters). A running request holds one slot."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots, "slot")
