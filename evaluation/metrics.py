"""ADM metrics on Inception features, in numpy (no torch): FID/sFID, Inception Score, precision/recall.

Definitions follow ADM's `evaluations/evaluator.py` (openai/guided-diffusion):
- FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)), covariances with ddof 1, float64.
- IS = mean over consecutive splits of 5000 of exp(E_x KL(p(y|x) || p(y))), p = softmax(pool_3 @ W).
- Precision/recall (Kynkaanniemi et al. 2019, k = 3): a point is on a manifold when its squared distance to
  some point of the other set is <= that point's k-th nearest-neighbour squared distance (self at index 0).
  Precision = fraction of samples on the reference manifold, recall = fraction of reference on the sample one.
  ADM computes those distances in float16 (float32 only when float16 overflows); we use float32 throughout,
  so a sample within float16 round-off of a ball's boundary may count differently.

Everything is accumulated from running sums, so shards of a batch can be merged exactly (sum, then divide).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

IS_SPLIT_SIZE = 5000
NEAREST_K = 3
ROW_BLOCK = 1024
COL_BLOCK = 10000

DistanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class MetricError(Exception):
    """Statistics that cannot give a metric (NaN/Inf, too few samples); the message is one line."""


class FewSamplesWarning(UserWarning):
    """Fewer samples than feature dimensions: the covariance is singular (FID is finite but biased)."""


# --------------------------------------------------------------------------------------------- FID


class FeatureStats:
    """Running count, sum and sum of outer products (float64) of feature vectors [N, D]."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    @classmethod
    def from_sums(cls, count: int, total: np.ndarray, outer: np.ndarray) -> FeatureStats:
        stats = cls(int(total.shape[0]))
        stats.count = int(round(float(count)))
        stats.total = np.asarray(total, np.float64)
        stats.outer = np.asarray(outer, np.float64)
        return stats

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64).reshape(-1, self.dim)  # [B, D]
        self.count += x.shape[0]
        self.total += x.sum(axis=0)
        self.outer += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise MetricError("no features accumulated")
        return self.total / self.count

    def cov(self, label: str = "features") -> np.ndarray:
        """Unbiased covariance (ddof 1): (sum x x^T - n mu mu^T) / (n - 1), symmetric up to round-off.
        `label` names the set in the warning given when there are fewer samples than dimensions."""
        if self.count < 2:
            raise MetricError(f"{label}: a covariance needs at least 2 images, got {self.count}")
        if self.count < self.dim:
            warnings.warn(f"{label}: {self.count} images for {self.dim}-d features: the covariance is singular; "
                          "FID is finite but biased (ADM uses 50,000 samples)", FewSamplesWarning, stacklevel=2)
        mu = self.mean()
        sigma = np.outer(mu, mu)  # one [D, D] allocation, then in place
        sigma *= -self.count
        sigma += self.outer
        sigma /= self.count - 1
        return sigma


def _factor(sigma: np.ndarray) -> np.ndarray | None:
    """Cholesky factor of a positive definite matrix, None when it is singular."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        return None


def sqrt_trace_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr(sqrt(S1 S2)) for symmetric PSD S1, S2 from one symmetric eigenvalue problem.

    With S1 = B B^T, S1 S2 is similar to B^T S2 B (symmetric PSD), so Tr(sqrt(S1 S2)) = sum_i sqrt(lambda_i),
    lambda = eigvalsh(B^T S2 B), tiny negative round-off clipped to 0. B is a Cholesky factor when S1 (or,
    swapping the roles, as S1 S2 and S2 S1 share eigenvalues, S2) is positive definite, the usual case with
    more samples than dimensions; else B = V diag(sqrt(max(w, 0))) from S1's eigendecomposition.
    """
    b = _factor(sigma1)
    if b is None:
        b = _factor(sigma2)
        if b is not None:
            sigma1, sigma2 = sigma2, sigma1
        else:  # both singular (fewer samples than dimensions on both sides)
            w, b = np.linalg.eigh(sigma1)
            b *= np.sqrt(np.clip(w, 0.0, None))  # V diag(sqrt(w)), [D, D], in place
    m = b.T @ sigma2 @ b
    lam = np.linalg.eigvalsh(m)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def _check_finite(name: str, *arrays: np.ndarray) -> None:
    for a in arrays:
        if not np.all(np.isfinite(a)):
            raise MetricError(f"{name} statistics contain NaN or Inf (bad images or a broken network?)")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     name: str = "FID") -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)) in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise MetricError(f"{name}: statistics have different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                          f"sigma {sigma1.shape} vs {sigma2.shape}")
    _check_finite(name, mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    # Cholesky and the symmetric eigensolvers read the lower triangle only: no symmetrised copies needed.
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * sqrt_trace_product(sigma1, sigma2))


# --------------------------------------------------------------------------------------------- Inception Score


def _softmax_terms(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p = softmax(logits) and sum_y p log p per row, in float64; logits [B, C]."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    return p, (p * log_p).sum(axis=1)


class InceptionScoreSums:
    """Per-split running sums for the Inception Score of images indexed 0..N-1 (consecutive splits).

    For a split with n rows: mean_x KL(p(.|x) || pbar) = (A - sum_y S_y log(S_y / n)) / n with
    A = sum_x sum_y p log p and S = sum_x p, so shards summed over processes give ADM's value exactly.
    """

    def __init__(self, num_images: int, num_classes: int, split_size: int = IS_SPLIT_SIZE):
        self.split_size = split_size
        num_splits = max(1, -(-num_images // split_size))
        self.count = np.zeros(num_splits, np.float64)
        self.plogp = np.zeros(num_splits, np.float64)
        self.psum = np.zeros((num_splits, num_classes), np.float64)

    def update(self, logits: np.ndarray, start: int) -> None:
        """Add rows `start .. start+B-1` of the whole batch (their global indices decide the split)."""
        p, plogp = _softmax_terms(logits)
        split = (start + np.arange(p.shape[0])) // self.split_size
        np.add.at(self.count, split, 1.0)
        np.add.at(self.plogp, split, plogp)
        for s in np.unique(split):
            self.psum[s] += p[split == s].sum(axis=0)

    def score(self) -> float:
        scores = []
        for n, a, s in zip(self.count, self.plogp, self.psum):
            if n == 0:
                continue
            pos = s > 0
            kl = (a - float((s[pos] * (np.log(s[pos]) - np.log(n))).sum())) / n  # no underflow of s/n
            scores.append(np.exp(kl))
        if not scores:
            raise MetricError("Inception Score: no images")
        return float(np.mean(scores))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of unbiased logits [N, C] (consecutive splits, no shuffling, mean only)."""
    logits = np.asarray(logits)
    _check_finite("Inception Score", logits)
    sums = InceptionScoreSums(logits.shape[0], logits.shape[1], split_size)
    sums.update(logits, 0)
    return sums.score()


# --------------------------------------------------------------------------------------------- precision/recall


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances [A, B] in float32: max(|a|^2 - 2 a.b + |b|^2, 0)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    d = (a * a).sum(axis=1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(axis=1)[None, :]
    return np.maximum(d, 0.0, out=d)


def knn_radii(features: np.ndarray, k: int = NEAREST_K, rows: tuple[int, int] | None = None,
              distance_fn: DistanceFn = squared_distances, row_block: int = ROW_BLOCK,
              col_block: int = COL_BLOCK) -> np.ndarray:
    """Squared distance to the k-th nearest neighbour (the point itself counts as the 0th) [R] float32.

    `rows=(start, stop)` computes the radii of those rows only (against all features), so processes can
    split the work. Memory: one [row_block, col_block] distance block plus the k+1 best per row.
    """
    n = features.shape[0]
    if n <= k:
        raise MetricError(f"precision/recall need more than {k} images per set, got {n}")
    start, stop = rows if rows is not None else (0, n)
    radii = np.empty(stop - start, np.float32)
    for r0 in range(start, stop, row_block):
        r1 = min(stop, r0 + row_block)
        best = None  # [rows, <= k+1] smallest distances so far
        for c0 in range(0, n, col_block):
            block = distance_fn(features[r0:r1], features[c0: c0 + col_block])
            pool = block if best is None else np.concatenate([best, block], axis=1)
            best = np.partition(pool, k, axis=1)[:, : k + 1] if pool.shape[1] > k + 1 else pool
        radii[r0 - start: r1 - start] = np.partition(best, k, axis=1)[:, k]
    return radii


def manifold_coverage(ref: np.ndarray, ref_radii: np.ndarray, sample: np.ndarray, sample_radii: np.ndarray,
                      ref_rows: tuple[int, int] | None = None, distance_fn: DistanceFn = squared_distances,
                      row_block: int = ROW_BLOCK, col_block: int = COL_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Which points lie inside the other set's k-NN balls, from one pass over reference x sample distances.

    Returns (ref_in [rows of ref_rows] bool: inside some sample ball -> recall,
             sample_in [all samples] bool: inside some ball of these reference rows -> precision).
    """
    start, stop = ref_rows if ref_rows is not None else (0, ref.shape[0])
    ref_in = np.zeros(stop - start, bool)
    sample_in = np.zeros(sample.shape[0], bool)
    for r0 in range(start, stop, row_block):
        r1 = min(stop, r0 + row_block)
        for c0 in range(0, sample.shape[0], col_block):
            c1 = min(sample.shape[0], c0 + col_block)
            d = distance_fn(ref[r0:r1], sample[c0:c1])  # [rows, cols]
            ref_in[r0 - start: r1 - start] |= (d <= sample_radii[None, c0:c1]).any(axis=1)
            sample_in[c0:c1] |= (d <= ref_radii[r0:r1, None]).any(axis=0)
    return ref_in, sample_in


def precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = NEAREST_K,
                     distance_fn: DistanceFn = squared_distances) -> tuple[float, float]:
    """ADM's (precision, recall) of sample features against reference features, both [N, D]."""
    _check_finite("precision/recall", ref, sample)
    ref_radii = knn_radii(ref, k, distance_fn=distance_fn)
    sample_radii = knn_radii(sample, k, distance_fn=distance_fn)
    ref_in, sample_in = manifold_coverage(ref, ref_radii, sample, sample_radii, distance_fn=distance_fn)
    return float(sample_in.mean()), float(ref_in.mean())
