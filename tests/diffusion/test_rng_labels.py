"""Class labels and the sample streams: the rule in diffusion/rng.py, checked against numpy and torch by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.rng import (
    BALANCED_LABELS,
    MAX_GLOBAL_SEED,
    RANDOM_LABELS,
    SampleNoise,
    class_labels,
    keyed_generator,
    keyed_state,
    sample_seed,
    stream_key,
)


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
        g = torch.Generator().manual_seed(3 * 2**21 + i)
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
        g = torch.Generator().manual_seed(7 * 2**21 + i)
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
        sample_seed(MAX_GLOBAL_SEED + 1, 0)
    with pytest.raises(ValueError, match="sample index"):
        sample_seed(0, 2**21)


def test_torch_keeps_only_32_bits_of_a_seed_which_the_rule_fits_in():
    """The defect behind identical images for every --global-seed: manual_seed(s * 2**32 + i) == manual_seed(i)."""
    draws = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (5, 7 * 2**32 + 5)]
    assert torch.equal(*draws)
    assert sample_seed(MAX_GLOBAL_SEED, 2**21 - 1) == 2**32 - 1  # the largest pair is the largest 32-bit seed


def test_distinct_global_seeds_give_distinct_streams_and_seed_0_keeps_its_images():
    assert [sample_seed(0, i) for i in range(5)] == list(range(5))  # the rule of every earlier version at seed 0
    seeds = {sample_seed(g, i) for g in (0, 1, 2, 1000, MAX_GLOBAL_SEED) for i in (0, 1, 2**20, 2**21 - 1)}
    assert len(seeds) == 20  # injective on the range
    x = [SampleNoise.for_samples(g, [3], 1000).randn((4,)) for g in (0, 1)]
    assert not torch.equal(*x)
    labels = [class_labels(64, 1000, g, RANDOM_LABELS) for g in (0, 1)]
    assert not np.array_equal(*labels)


def test_keyed_state_is_torchs_layout_of_numpys_mt19937():
    """numpy's RandomState(int) seeds MT19937 as torch does: putting its words in keyed_state's layout gives
    manual_seed's stream, so the layout is right; an array key gives numpy's init_by_array words."""
    words = np.random.RandomState(777).get_state()[1]
    state = keyed_state([0]).numpy().copy()
    state[24:24 + 624 * 8] = words.astype("<u8").view(np.uint8)
    g = torch.Generator().set_state(torch.from_numpy(state))
    assert torch.equal(torch.randn(50, generator=g), torch.randn(50, generator=torch.Generator().manual_seed(777)))
    key = stream_key(2, 1, 2**40 + 3)
    g = keyed_generator(key)
    expected = np.random.RandomState(np.array(key, dtype=np.uint32)).get_state()[1]
    got = np.frombuffer(g.get_state().numpy().tobytes(), dtype="<u8", count=624, offset=24)
    assert np.array_equal(got, expected)


def test_keyed_streams_differ_in_every_key_word_and_repeat_for_the_same_key():
    keys = [stream_key(p, g, n) for p in (1, 2) for g in (0, 1) for n in (0, 1, 2**32)]
    draws = [tuple(torch.randn(3, generator=keyed_generator(k)).tolist()) for k in keys]
    assert len(set(draws)) == len(keys)
    assert torch.equal(torch.randn(3, generator=keyed_generator(keys[3])), torch.tensor(draws[3]))
    with pytest.raises(ValueError, match="key part"):
        stream_key(1, -1)
