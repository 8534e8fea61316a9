"""The prefix cache's index: full KV pages, found by the tokens of the prefix that ends with them.

Pure Python. Each indexed page is a node of a trie whose edges are whole pages: its key is its
parent's node id (or, for a prompt's first page, the request's cache salt) together with the
page's ``page_size`` token ids. Lookups walk from the root one page at a time, so a prompt's
longest cached prefix costs one dict lookup per page.

Why this shape rather than a radix tree over tokens (SGLang) or chained hashes (vLLM):

* Only full pages are shared, so page granularity loses nothing against a token radix tree
  and needs no node splitting.
* Keys hold the token ids themselves, so a lookup compares them exactly. Chained 64-bit hashes
  of the tokens could collide; with tenants on one server, a crafted collision would hand one
  request another's KV. The dict hashes the tuple only to find a bucket.
* A page's node id is fresh every time it is indexed, so the children of an evicted page can
  never be reached through a new page that reuses its id. They stay in the dict, unreachable,
  until eviction reaches them too; the allocator evicts a released request's deeper pages first,
  so that is rare.

The allocator (``page_allocator.PageAllocator``) owns reference counts and eviction; this class
only maps keys to pages.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

# The parent of a prompt's first page: the request's cache salt (None when it has none). Node
# ids are ints, so a salt can never be mistaken for one.
Parent = int | str | None


class PrefixIndex:
    """Maps (parent node, a page's token ids) to the page holding their KV."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._pages: dict[tuple[Parent, tuple[int, ...]], tuple[int, int]] = {}  # -> page, node
        self._key_of: dict[int, tuple[Parent, tuple[int, ...]]] = {}  # indexed page -> key
        self._node_ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, page: int) -> bool:
        return page in self._key_of

    def match(
        self, tokens: Sequence[int], max_pages: int, salt: str | None = None
    ) -> tuple[list[int], Parent]:
        """The pages of the longest indexed prefix of ``tokens``, at most ``max_pages`` of them,
        and the node of the last one (``salt`` when none matched), to extend the chain from."""
        ps = self.page_size
        pages: list[int] = []
        parent: Parent = salt
        get = self._pages.get
        for i in range(max_pages):
            hit = get((parent, tuple(tokens[i * ps : (i + 1) * ps])))
            if hit is None:
                break
            pages.append(hit[0])
            parent = hit[1]
        return pages, parent

    def insert(self, parent: Parent, tokens: Sequence[int], page: int) -> Parent:
        """Index ``page`` as holding ``tokens`` (one full page) after ``parent``. Returns the node
        to extend the chain from: this page's, or that of an equal page indexed earlier (then
        ``page`` stays unindexed, private to its holder)."""
        key = (parent, tuple(tokens))
        hit = self._pages.get(key)
        if hit is not None:
            return hit[1]
        node = next(self._node_ids)
        self._pages[key] = (page, node)
        self._key_of[page] = key
        return node

    def remove(self, page: int) -> None:
        """Forget ``page`` (it is being evicted)."""
        del self._pages[self._key_of.pop(page)]
