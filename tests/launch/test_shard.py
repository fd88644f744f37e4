"""The work plan: shares, batches, rounds and labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.rng import SampleNoise, sample_seed
from launch.shard import batches, num_rounds, plan_labels, rank_batches, split_evenly


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


def test_balanced_labels_are_exact_when_c_divides_n_and_even_otherwise():
    labels = plan_labels(1000, 10, 0, "balanced", sample_seed)
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10
    counts = np.bincount(plan_labels(23, 10, 5, "balanced", sample_seed), minlength=10)
    assert set(counts.tolist()) == {2, 3} and counts.sum() == 23
    assert not np.array_equal(labels, plan_labels(1000, 10, 1, "balanced", sample_seed))


def test_random_label_i_is_the_first_draw_of_generator_i():
    labels = plan_labels(6, 1000, 3, "random", sample_seed)
    for i, label in enumerate(labels):
        g = torch.Generator().manual_seed(3 * 2**32 + i)
        assert label == int(torch.randint(1000, (1,), generator=g))
    noise = SampleNoise([sample_seed(3, i) for i in range(6)])
    assert noise.randint(1000).tolist() == labels.tolist()


def test_sample_noise_does_not_depend_on_batch_composition():
    alone = SampleNoise([sample_seed(0, 5)])
    together = SampleNoise([sample_seed(0, i) for i in range(3, 8)])
    assert torch.equal(alone.randn((2, 4, 4))[0], together.randn((2, 4, 4))[2])
    state = torch.random.get_rng_state()
    together(torch.empty(5, 3))
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="global seed"):
        sample_seed(2**32, 0)
