"""Decode batch-size buckets: which graphs to capture and which one a batch replays."""

from __future__ import annotations

import bisect


def default_buckets(max_bs: int) -> list[int]:
    """Dense at small sizes, where padding waste matters most, then every 16 up to ``max_bs``.

    ``max_bs`` itself is always included.
    """
    if max_bs <= 0:
        return []
    dense = [1, 2, 4, 8, 12, 16, 24, 32]
    sizes = [b for b in dense if b <= max_bs]
    sizes += range(48, max_bs + 1, 16)
    sizes = sorted(set(sizes) | {max_bs})
    return sizes


def make_buckets(
    cuda_graph_max_bs: int, explicit: tuple[int, ...] | None, max_num_seqs: int
) -> list[int]:
    """The sorted buckets to capture. No bucket exceeds ``max_num_seqs`` (no batch can)."""
    if cuda_graph_max_bs == 0:
        return []
    if explicit is not None:
        sizes = sorted(b for b in set(explicit) if b <= max_num_seqs)
        if not sizes:
            raise ValueError(
                f"cuda_graph_batch_sizes {list(explicit)} are all above max_num_seqs={max_num_seqs}"
            )
        return sizes
    return default_buckets(min(cuda_graph_max_bs, max_num_seqs))


def bucket_for(buckets: list[int], batch_size: int) -> int | None:
    """The smallest bucket that holds ``batch_size`` rows, or None (run eagerly)."""
    i = bisect.bisect_left(buckets, batch_size)
    return buckets[i] if i < len(buckets) else None
