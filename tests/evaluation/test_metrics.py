"""evaluation.metrics against straightforward numpy/scipy computations of ADM's definitions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
from adm_numpy import is_adm_numpy
from scipy.spatial.distance import cdist

from evaluation.metrics import (
    FeatureStats,
    FewSamplesWarning,
    InceptionScoreSums,
    MetricError,
    frechet_distance,
    inception_score,
    knn_radii,
    precision_recall,
    sqrt_trace_product,
)


def correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift


def fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """The TTUR/ADM formula with scipy.linalg.sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_streamed_stats_equal_whole():
    rng = np.random.default_rng(0)
    x = correlated(rng, 103, 9, shift=5.0)
    stats = FeatureStats(9)
    for a in range(0, 103, 10):
        stats.update(x[a: a + 10])
    np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    left, right = FeatureStats(9), FeatureStats(9)
    left.update(x[:40])
    right.update(x[40:])
    merged = left.merge(right)
    np.testing.assert_allclose(merged.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    rebuilt = FeatureStats.from_sums(merged.count, merged.total, merged.outer)
    np.testing.assert_allclose(rebuilt.mean(), x.mean(0), rtol=1e-12)


def test_fid_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a, b = correlated(rng, 200, 16), correlated(rng, 150, 16, shift=0.5)
    ours = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert ours == pytest.approx(fid_scipy(a, b), rel=1e-9)
    assert frechet_distance(a.mean(0), np.cov(a, rowvar=False), a.mean(0), np.cov(a, rowvar=False)) == \
        pytest.approx(0.0, abs=1e-9)


def test_sqrt_trace_singular_and_closed_form():
    # Diagonal covariances: Tr(sqrt(S1 S2)) = sum sqrt(d1 d2), including zero (singular) entries.
    d1, d2 = np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 0.25, 3.0, 4.0])
    assert sqrt_trace_product(np.diag(d1), np.diag(d2)) == pytest.approx(np.sqrt(d1 * d2).sum(), rel=1e-12)
    assert sqrt_trace_product(np.diag(d2), np.diag(d1)) == pytest.approx(np.sqrt(d1 * d2).sum(), rel=1e-12)
    d3 = np.array([0.0, 2.0, 5.0, 0.0])  # both singular: the eigendecomposition path
    assert sqrt_trace_product(np.diag(d1), np.diag(d3)) == pytest.approx(np.sqrt(d1 * d3).sum(), rel=1e-12)
    # Fewer samples than dimensions: warning, finite answer close to sqrtm's.
    rng = np.random.default_rng(2)
    a, b = correlated(rng, 6, 10), correlated(rng, 7, 10, shift=0.2)
    sa, sb = FeatureStats(10), FeatureStats(10)
    sa.update(a)
    sb.update(b)
    with pytest.warns(FewSamplesWarning):
        cov_a = sa.cov()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = frechet_distance(sa.mean(), cov_a, sb.mean(), sb.cov())
    assert np.isfinite(value)
    assert value == pytest.approx(fid_scipy(a, b), rel=1e-6)


def test_fid_errors():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(MetricError, match="NaN or Inf"):
        frechet_distance(mu, sigma, np.array([0.0, np.nan, 0.0]), sigma)
    with pytest.raises(MetricError, match="different dimensions"):
        frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(MetricError, match="at least 2"):
        s = FeatureStats(3)
        s.update(np.ones((1, 3)))
        s.cov()



def test_inception_score_matches_numpy_and_shards():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((23, 11)) * 3
    expected = is_adm_numpy(logits, 7)  # splits of 7, 7, 7, 2
    assert inception_score(logits, split_size=7) == pytest.approx(expected, rel=1e-12)
    sums = InceptionScoreSums(23, 11, split_size=7)
    for a, b in ((0, 5), (5, 16), (16, 23)):  # shards that straddle split boundaries
        sums.update(logits[a:b], start=a)
    assert sums.score() == pytest.approx(expected, rel=1e-12)
    uniform = np.zeros((10, 5))
    assert inception_score(uniform) == pytest.approx(1.0, rel=1e-12)


def pr_brute_force(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al.: k-th neighbour radius (self included as 0th), ball membership, float64."""
    d_rr, d_ss, d_rs = cdist(ref, ref), cdist(sample, sample), cdist(ref, sample)
    r_ref = np.sort(d_rr, axis=1)[:, k]
    r_sample = np.sort(d_ss, axis=1)[:, k]
    precision = np.mean([(d_rs[:, j] <= r_ref).any() for j in range(len(sample))])
    recall = np.mean([(d_rs[i, :] <= r_sample).any() for i in range(len(ref))])
    return float(precision), float(recall)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((37, 8)).astype(np.float32)
    sample = (rng.standard_normal((29, 8)) * 1.4 + 0.6).astype(np.float32)
    expected = pr_brute_force(ref.astype(np.float64), sample.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(ref, sample) == pytest.approx(expected, abs=1e-12)
    # Blocked computation (small blocks, partial rows) gives the same radii.
    full = knn_radii(ref)
    blocked = np.concatenate([knn_radii(ref, rows=(0, 20), row_block=6, col_block=7),
                              knn_radii(ref, rows=(20, 37), row_block=5, col_block=9)])
    np.testing.assert_allclose(blocked, full, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(full), np.sort(cdist(ref, ref), axis=1)[:, 3], rtol=1e-4)


def test_precision_recall_needs_enough_points():
    with pytest.raises(MetricError, match="more than 3"):
        precision_recall(np.zeros((3, 4), np.float32), np.ones((10, 4), np.float32))
