"""evaluation.statistics against numpy: running float64 sums (plain and weighted) and ADM's Inception Score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adm_numpy import is_adm_numpy

from evaluation.errors import MetricError
from evaluation.statistics import FeatureStats, InceptionScoreSums, inception_score


def correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift


def test_streamed_stats_equal_whole():
    rng = np.random.default_rng(0)
    x = correlated(rng, 103, 9, shift=5.0)
    stats = FeatureStats(9)
    for a in range(0, 103, 10):
        stats.update(x[a: a + 10])
    np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    mixed = FeatureStats(9)
    mixed.update(x[:40])
    mixed.update(torch.from_numpy(x[40:]).float())  # float32 torch rows are summed in float64 too
    np.testing.assert_allclose(mixed.cov(), np.cov(x, rowvar=False), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(mixed.mean(), x.mean(0), rtol=1e-6)
    assert mixed.reduce() is mixed and mixed.count == 103  # one process: the sums are the whole batch's


def test_weighted_update_equals_repeated_rows():
    """A bootstrap resample's statistics from multiplicities = those of the rows repeated."""
    rng = np.random.default_rng(1)
    x = correlated(rng, 30, 5)
    idx = rng.integers(0, 30, 30)
    counts = np.bincount(idx, minlength=30)
    weighted = FeatureStats(5)
    weighted.update(x[:12], counts[:12])
    weighted.update(x[12:], counts[12:])
    assert weighted.count == 30
    np.testing.assert_allclose(weighted.mean(), x[idx].mean(0), rtol=1e-12)
    np.testing.assert_allclose(weighted.cov(), np.cov(x[idx], rowvar=False), rtol=1e-10, atol=1e-12)


def test_inception_score_matches_numpy_and_shards():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((23, 11)) * 3
    expected = is_adm_numpy(logits, 7)  # splits of 7, 7, 7, 2
    assert inception_score(logits, split_size=7) == pytest.approx(expected, rel=1e-12)
    sums = InceptionScoreSums(23, 11, split_size=7)
    for a, b in ((0, 5), (5, 16), (16, 23)):  # shards that straddle split boundaries
        sums.update(logits[a:b], a)
    assert sums.score() == pytest.approx(expected, rel=1e-12)
    uniform = np.zeros((10, 5))
    assert inception_score(uniform) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(MetricError, match="NaN or Inf"):
        inception_score(np.full((3, 4), np.nan))


def test_inception_score_from_scattered_indices_and_weights():
    """Images may arrive in any order (a sampling job's ranks); a resample's splits are per-split weights."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((23, 11)) * 3
    expected = is_adm_numpy(logits, 7)
    order = rng.permutation(23)
    sums = InceptionScoreSums(23, 11, split_size=7)
    for part in np.array_split(order, 4):
        sums.update(torch.from_numpy(logits[part]), torch.from_numpy(part))
    assert sums.score() == pytest.approx(expected, rel=1e-12)
    idx = rng.integers(0, 23, 23)  # a resample: position j holds image idx[j]
    weights = np.zeros((sums.num_splits, 23))
    np.add.at(weights, (np.arange(23) // 7, idx), 1.0)
    resampled = InceptionScoreSums(23, 11, split_size=7)
    resampled.add_weighted(logits, torch.from_numpy(weights))
    assert resampled.score() == pytest.approx(is_adm_numpy(logits[idx], 7), rel=1e-12)
