"""The data-parallel bucket layout: contiguous, ordered, at least MIN_BUCKETS buckets for a
group larger than the edge, a last bucket of at most EDGE_MB, oversized parameters alone."""
from __future__ import annotations

from parallel.data import EDGE_MB, MIN_BUCKETS, bucket_layout

MiB = 2**20


def _flat(buckets: list[list[int]]) -> list[int]:
    return [i for b in buckets for i in b]


def test_model_smaller_than_bucket_still_gets_several_buckets_and_a_small_tail():
    sizes = [MiB // 2] * 24  # 12 MiB of gradients, default 25 MiB buckets
    buckets = bucket_layout(sizes, 25 * MiB)
    assert _flat(buckets) == list(range(24))
    assert len(buckets) >= MIN_BUCKETS
    assert sum(sizes[i] for i in buckets[-1]) <= EDGE_MB * MiB
    assert max(sum(sizes[i] for i in b) for b in buckets) <= 12 * MiB // MIN_BUCKETS


def test_bucket_limit_is_respected_and_tail_filled_from_the_end():
    sizes = [MiB // 2] * 24
    buckets = bucket_layout(sizes, 2 * MiB)
    assert [sum(sizes[i] for i in b) / MiB for b in buckets] == [2, 2, 2, 2, 2, 1, 1]  # 11 MiB, then the tail


def test_oversized_parameters_get_their_own_bucket():
    sizes = [3 * MiB, MiB // 4, MiB // 4, 5 * MiB]  # the earliest-registered (last) one is huge
    assert bucket_layout(sizes, 4 * MiB) == [[0], [1, 2], [3]]


def test_small_groups_are_one_bucket():
    assert bucket_layout([100] * 5, 1000) == [[0, 1, 2, 3, 4]]
    assert bucket_layout([], 1000) == []
