"""Page and slot allocators (id 0 is the reserved dummy) and the KV pool layout."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphrt.memory import DUMMY_PAGE, DUMMY_SLOT, KVPool, PageAllocator, SlotAllocator
from graphrt.memory.kv_pool import KVPoolSpec
from graphrt.memory.page_allocator import IdPool


def test_dummy_ids_are_zero() -> None:
    assert DUMMY_PAGE == 0 and DUMMY_SLOT == 0


def test_fresh_pool_counts_and_order() -> None:
    pool = IdPool(5, "page")
    assert pool.num_usable == 4 and pool.num_free == 4 and pool.num_used == 0
    assert pool.allocate(2) == [1, 2]
    assert pool.allocate_one() == 3
    assert pool.num_used == 3 and pool.num_free == 1


def test_allocate_all_never_hands_out_the_dummy() -> None:
    pool = IdPool(9, "slot")
    ids = pool.allocate(8)
    assert sorted(ids) == list(range(1, 9))
    assert DUMMY_SLOT not in ids
    assert pool.num_free == 0
    with pytest.raises(MemoryError):
        pool.allocate_one()


def test_round_trip_restores_full_pool() -> None:
    pool = PageAllocator(6, page_size=4)
    a = pool.allocate(3)
    b = pool.allocate(2)
    pool.free(a)
    pool.free(b)
    assert pool.num_free == pool.num_usable == 5
    assert sorted(pool.allocate(5)) == [1, 2, 3, 4, 5]


def test_allocate_zero_and_can_allocate() -> None:
    pool = IdPool(3, "page")
    assert pool.allocate(0) == []
    assert pool.can_allocate(2) and not pool.can_allocate(3)
    with pytest.raises(MemoryError, match="page"):
        pool.allocate(3)
    assert pool.num_free == 2  # a refused request takes nothing


def test_negative_count_is_refused() -> None:
    pool = IdPool(6, "page")
    # A negative count must not slice ids off the free list.
    with pytest.raises(ValueError, match="page"):
        pool.allocate(-2)
    assert pool.num_free == 5
    assert not pool.can_allocate(-1)


def test_double_free_raises() -> None:
    pool = IdPool(4, "page")
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([ids[0]])
    assert pool.num_free == 3


@pytest.mark.parametrize("bad", [0, -1, 4, 99])
def test_freeing_foreign_or_dummy_ids_raises(bad: int) -> None:
    pool = IdPool(4, "slot")
    pool.allocate(3)
    with pytest.raises(ValueError, match="slot"):
        pool.free([bad])


def test_freeing_never_allocated_id_raises() -> None:
    pool = IdPool(4, "page")
    pool.allocate(1)  # id 1
    with pytest.raises(ValueError):
        pool.free([2])


@pytest.mark.parametrize("capacity", [-1, 0, 1])
def test_capacity_below_two_rejected(capacity: int) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        PageAllocator(capacity, page_size=16)
    with pytest.raises(ValueError, match="at least 2"):
        SlotAllocator(capacity)


def test_minimal_pool_has_one_usable_id() -> None:
    pool = SlotAllocator(2)
    assert pool.allocate(1) == [1]


@pytest.mark.parametrize(
    ("tokens", "page_size", "pages"),
    [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (32, 16, 2), (33, 16, 3), (5, 1, 5)],
)
def test_pages_for(tokens: int, page_size: int, pages: int) -> None:
    assert PageAllocator(4, page_size).pages_for(tokens) == pages


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(2, 40), seed=st.integers(0, 2**32))
def test_random_allocate_free_keeps_pool_consistent(capacity: int, seed: int) -> None:
    rng = random.Random(seed)
    pool = IdPool(capacity, "page")
    held: list[list[int]] = []
    for _ in range(60):
        if held and rng.random() < 0.45:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(0, 4)
            if pool.can_allocate(n):
                held.append(pool.allocate(n))
            else:
                with pytest.raises(MemoryError):
                    pool.allocate(n)
        flat = [i for h in held for i in h]
        assert len(flat) == len(set(flat)), "an id was handed out twice"
        assert all(0 < i < capacity for i in flat)
        assert pool.num_used == len(flat)
        assert pool.num_free + pool.num_used == pool.num_usable
    for h in held:
        pool.free(h)
    assert pool.num_free == capacity - 1


def test_kv_pool_layout_and_sizes() -> None:
    spec = KVPoolSpec(num_layers=2, num_kv_heads=3, head_dim=4, page_size=8, dtype=torch.float16)
    assert spec.bytes_per_page == 2 * 2 * 8 * 3 * 4 * 2
    assert spec.bytes_per_token == spec.bytes_per_page // 8
    pool = KVPool(spec, num_pages=5, device=torch.device("cpu"))
    assert pool.nbytes == 5 * spec.bytes_per_page
    assert len(pool.k) == len(pool.v) == 2
    assert pool.k[0].shape == (5, 8, 3, 4)
    # Zero-filled, so the dummy page holds finite values before anything writes it.
    assert all(t.abs().sum() == 0 for t in pool.k + pool.v)
    # The flat view maps (page, offset) to page * page_size + offset, sharing storage.
    flat = pool.flat_k(1)
    assert flat.shape == (5 * 8, 3, 4)
    flat[3 * 8 + 5].fill_(7.0)
    assert pool.k[1][3, 5].eq(7.0).all()
    assert pool.k[0].abs().sum() == 0 and pool.v[1].abs().sum() == 0
    pool.flat_v(0)[1].fill_(2.0)
    assert pool.v[0][0, 1].eq(2.0).all()
