"""Class labels and the sample streams: the rule in diffusion/rng.py, checked against numpy and torch by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.rng import BALANCED_LABELS, RANDOM_LABELS, SampleNoise, class_labels, sample_seed


def test_balanced_labels_are_exact_when_c_divides_n_and_even_otherwise():
    labels = class_labels(1000, 10, 0, BALANCED_LABELS)
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10
    assert np.array_equal(labels, np.random.default_rng(0).permutation(np.arange(1000) % 10))
    counts = np.bincount(class_labels(23, 10, 5, BALANCED_LABELS), minlength=10)
    assert set(counts.tolist()) == {2, 3} and counts.sum() == 23
    assert not np.array_equal(labels, class_labels(1000, 10, 1, BALANCED_LABELS))


def test_random_label_i_is_the_first_draw_of_generator_i():
    labels = class_labels(6, 1000, 3, RANDOM_LABELS)
    for i, label in enumerate(labels):
        g = torch.Generator().manual_seed(3 * 2**32 + i)
        assert label == int(torch.randint(1000, (1,), generator=g))
    with pytest.raises(ValueError, match="label sampling"):
        class_labels(6, 10, 0, "uniform")


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_streams_for_sampling_start_after_the_label_draw(num_classes):
    """x_T of sample i is draw 2 of generator seed_i whatever the label rule (the official layout)."""
    indices = [4, 9, 2]
    noise = SampleNoise.for_samples(7, indices, num_classes)
    x_T = noise.randn((2, 3, 3))
    for row, i in zip(x_T, indices):
        g = torch.Generator().manual_seed(7 * 2**32 + i)
        torch.randint(num_classes, (1,), generator=g)
        assert torch.equal(row, torch.randn((2, 3, 3), generator=g))


def test_sample_noise_does_not_depend_on_batch_composition():
    alone = SampleNoise([sample_seed(0, 5)])
    together = SampleNoise([sample_seed(0, i) for i in range(3, 8)])
    assert torch.equal(alone.randn((2, 4, 4))[0], together.randn((2, 4, 4))[2])
    state = torch.random.get_rng_state()
    together(torch.empty(5, 3))
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="global seed"):
        sample_seed(2**32, 0)
