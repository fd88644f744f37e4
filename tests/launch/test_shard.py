"""The work plan: shares, batches and rounds."""

from __future__ import annotations

import pytest

from launch.runtime.partition import batches, num_rounds, rank_batches, split_evenly


@pytest.mark.parametrize(("n", "world"), [(10, 1), (10, 3), (50_000, 8), (7, 8), (0, 2)])
def test_shares_are_floor_or_ceil_and_cover_every_index_once(n, world):
    items = list(range(n))
    shares = [list(split_evenly(items, world, r)) for r in range(world)]
    assert sorted(i for s in shares for i in s) == items
    assert {len(s) for s in shares} <= {n // world, -(-n // world)}


def test_every_rank_runs_the_same_number_of_rounds():
    missing = list(range(23))
    per_rank = [list(rank_batches(missing, 4, r, 2)) for r in range(4)]
    assert [len(b) for b in per_rank] == [num_rounds(23, 4, 2)] * 4 == [3] * 4
    flat = sorted(i for rank in per_rank for b in rank for i in b)
    assert flat == missing
    assert batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
