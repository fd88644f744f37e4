"""evaluation.frechet against scipy's matrix square root and closed forms of ADM's FID."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg

from evaluation.errors import MetricError
from evaluation.frechet import frechet_distance, sqrt_trace_product
from evaluation.statistics import FeatureStats, FewSamplesWarning


def correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift


def fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """The TTUR/ADM formula with scipy.linalg.sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


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
