"""Pages, slots and the KV pool. The scheduler uses the allocators; the runner owns the pool."""

from graphrt.memory.kv_pool import KVPool
from graphrt.memory.page_allocator import DUMMY_PAGE, DUMMY_SLOT, PageAllocator, SlotAllocator

__all__ = ["DUMMY_PAGE", "DUMMY_SLOT", "KVPool", "PageAllocator", "SlotAllocator"]
