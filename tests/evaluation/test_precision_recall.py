"""evaluation.precision_recall (torch.topk and comparisons on the device) against numpy: ADM's formula and
a brute-force scipy version; exactly the same per-point decisions on features without near-ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adm_numpy import manifold_decisions_adm_numpy
from scipy.spatial.distance import cdist

from evaluation.errors import MetricError
from evaluation.precision_recall import knn_radii, manifold_coverage, manifold_membership, precision_recall


def pr_brute_force(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al.: k-th neighbour radius (self included as 0th), ball membership, float64."""
    d_rr, d_ss, d_rs = cdist(ref, ref), cdist(sample, sample), cdist(ref, sample)
    r_ref = np.sort(d_rr, axis=1)[:, k]
    r_sample = np.sort(d_ss, axis=1)[:, k]
    precision = np.mean([(d_rs[:, j] <= r_ref).any() for j in range(len(sample))])
    recall = np.mean([(d_rs[i, :] <= r_sample).any() for i in range(len(ref))])
    return float(precision), float(recall)


def overlapping_sets(seed: int, n_ref: int, n_sample: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian clouds, shifted and scaled, so that both shares lie strictly between 0 and 1."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n_ref, dim)).astype(np.float32)
    sample = (rng.standard_normal((n_sample, dim)) * 1.4 + 0.6).astype(np.float32)
    return ref, sample


def test_precision_recall_matches_brute_force():
    ref, sample = overlapping_sets(5, 37, 29, 8)
    expected = pr_brute_force(ref.astype(np.float64), sample.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(ref, sample, device="cpu") == pytest.approx(expected, abs=1e-12)
    # Blocked computation (small blocks, partial rows) gives the same radii.
    features = torch.from_numpy(ref)
    full = knn_radii(features)
    blocked = torch.cat([knn_radii(features, rows=(0, 20), row_block=6, col_block=7),
                         knn_radii(features, rows=(20, 37), row_block=5, col_block=2)])
    torch.testing.assert_close(blocked, full, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.sqrt(full.numpy()), np.sort(cdist(ref, ref), axis=1)[:, 3], rtol=1e-4)


def test_decisions_equal_adm_numpy():
    """Every sample's and every reference point's decision equals ADM's, whole and in small blocks."""
    ref, sample = overlapping_sets(6, 300, 250, 64)
    sample_on_ref, ref_on_sample = manifold_decisions_adm_numpy(ref, sample)
    assert 0 < sample_on_ref.mean() < 1 and 0 < ref_on_sample.mean() < 1
    got_sample, got_ref = manifold_membership(ref, sample, device="cpu")
    np.testing.assert_array_equal(got_sample, sample_on_ref)
    np.testing.assert_array_equal(got_ref, ref_on_sample)
    r, s = torch.from_numpy(ref), torch.from_numpy(sample)
    r_radii, s_radii = knn_radii(r, row_block=64, col_block=50), knn_radii(s, row_block=64, col_block=50)
    ref_in, sample_in = manifold_coverage(r, r_radii, s, s_radii, row_block=64, col_block=50)
    np.testing.assert_array_equal(sample_in.numpy(), sample_on_ref)
    np.testing.assert_array_equal(ref_in.numpy(), ref_on_sample)


def test_precision_recall_needs_enough_points():
    with pytest.raises(MetricError, match="more than 3"):
        precision_recall(np.zeros((3, 4), np.float32), np.ones((10, 4), np.float32), device="cpu")
    with pytest.raises(MetricError, match="NaN or Inf"):
        precision_recall(np.full((5, 4), np.nan, np.float32), np.ones((10, 4), np.float32), device="cpu")
