"""Running statistics of Inception features that shards of a batch can sum exactly (EDM's fid.py style).

- `FeatureStats`: count, sum and sum of outer products in float64 (FID, sFID), kept on the device the
  features come from; `reduce()` all-reduces them over the ranks of `launch.runtime.dist`.
- `InceptionScoreSums`: per-split sums for ADM's Inception Score (consecutive splits of 5000 by global image
  index): n, A = sum_x sum_y p log p and S = sum_x p, so that mean_x KL(p(.|x) || pbar) = (A - sum_y S_y
  log(S_y / n)) / n; `reduce()` all-reduces them too.

Both take optional per-image weights (the multiplicities of a bootstrap resample) besides plain updates.
Mean and covariance come back as float64 numpy arrays for the Frechet distance.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from evaluation.errors import MetricError
from launch.runtime import dist

IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score
MIN_COV_IMAGES = 2  # a covariance (ddof 1) needs two

Array = np.ndarray | torch.Tensor


class FewSamplesWarning(UserWarning):
    """Fewer samples than feature dimensions: the covariance is singular (FID is finite but biased)."""


def _as_float64(x: Array, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(x).to(device, torch.float64)


class FeatureStats:
    """Running count, sum and sum of outer products (float64) of feature vectors [N, D] on `device`."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)  # [D]
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # [D, D]

    def update(self, features: Array, weights: Array | None = None) -> None:
        """Add rows [B, D]; `weights` [B] counts row b weights[b] times (a bootstrap resample)."""
        x = _as_float64(features, self.total.device).reshape(-1, self.dim)
        if weights is None:
            self.count += x.shape[0]
            self.total += x.sum(dim=0)
            self.outer.addmm_(x.T, x)
            return
        w = _as_float64(weights, self.total.device)
        self.count += int(round(float(w.sum())))
        self.total += w @ x
        self.outer.addmm_(x.T, x * w[:, None])

    def reduce(self) -> FeatureStats:
        """Sum over ranks (float64 all-reduce on the process group's device), in place. A collective."""
        if dist.world_size() == 1:
            return self
        device = dist.info().device
        self.total = dist.all_reduce_sum(self.total.to(device))
        self.outer = dist.all_reduce_sum(self.outer.to(device))
        (count,) = dist.sum_over_ranks([float(self.count)])
        self.count = int(round(count))
        return self

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise MetricError("no features accumulated")
        return self.total.cpu().numpy() / self.count

    def cov(self, label: str = "features") -> np.ndarray:
        """Unbiased covariance (ddof 1): (sum x x^T - n mu mu^T) / (n - 1), symmetric up to round-off.
        `label` names the set in the warning given when there are fewer samples than dimensions."""
        if self.count < MIN_COV_IMAGES:
            raise MetricError(f"{label}: a covariance needs at least {MIN_COV_IMAGES} images, got {self.count}")
        if self.count < self.dim:
            warnings.warn(f"{label}: {self.count} images for {self.dim}-d features: the covariance is singular; "
                          "FID is finite but biased (ADM uses 50,000 samples)", FewSamplesWarning, stacklevel=2)
        mu = self.mean()
        sigma = np.outer(mu, mu)  # one [D, D] allocation, then in place
        sigma *= -self.count
        sigma += self.outer.cpu().numpy()
        sigma /= self.count - 1
        return sigma


def softmax_terms(logits: Array, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(logits) [B, C] and sum_y p log p [B], in float64 on `device`."""
    z = _as_float64(logits, device)
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    return p, (p * log_p).sum(dim=1)


def split_weights(indices: Array, num_splits: int, split_size: int, device: torch.device) -> torch.Tensor:
    """One-hot [S, B]: row b of a batch with global image indices `indices` [B] belongs to split index // size."""
    split = torch.as_tensor(indices, dtype=torch.int64).to(device) // split_size
    weights = torch.zeros(num_splits, split.shape[0], dtype=torch.float64, device=device)
    weights[split, torch.arange(split.shape[0], device=device)] = 1.0
    return weights


class InceptionScoreSums:
    """Per-split running sums for the Inception Score of images indexed 0..N-1 (consecutive splits)."""

    def __init__(self, num_images: int, num_classes: int, split_size: int = IS_SPLIT_SIZE,
                 device: str | torch.device = "cpu"):
        self.split_size = split_size
        self.num_splits = max(1, -(-num_images // split_size))
        self.device = torch.device(device)
        self.count = torch.zeros(self.num_splits, dtype=torch.float64, device=self.device)  # [S]
        self.plogp = torch.zeros(self.num_splits, dtype=torch.float64, device=self.device)  # [S]
        self.psum = torch.zeros(self.num_splits, num_classes, dtype=torch.float64, device=self.device)  # [S, C]

    def update(self, logits: Array, indices: Array | int) -> None:
        """Add logits [B, C] of the images with global indices `indices` [B] (an int: start .. start+B-1)."""
        if isinstance(indices, int):
            indices = torch.arange(indices, indices + logits.shape[0])
        self.add_weighted(logits, split_weights(indices, self.num_splits, self.split_size, self.device))

    def add_weighted(self, logits: Array, weights: torch.Tensor) -> None:
        """Add row b of `logits` [B, C] weights[s, b] times to split s (`weights` [S, B])."""
        p, plogp = softmax_terms(logits, self.device)
        w = weights.to(self.device, torch.float64)
        self.count += w.sum(dim=1)
        self.plogp += w @ plogp
        self.psum += w @ p

    def reduce(self) -> InceptionScoreSums:
        """Sum over ranks (one float64 all-reduce), in place. A collective."""
        if dist.world_size() == 1:
            return self
        packed = torch.cat([self.count, self.plogp, self.psum.ravel()]).to(dist.info().device)
        packed = dist.all_reduce_sum(packed).to(self.device)
        s = self.num_splits
        self.count, self.plogp, self.psum = packed[:s], packed[s: 2 * s], packed[2 * s:].reshape(s, -1)
        return self

    def score(self) -> float:
        """Mean over the splits of exp(mean KL); splits without images are skipped."""
        scores = []
        for n, a, s in zip(self.count.tolist(), self.plogp.tolist(), self.psum.cpu().numpy()):
            if n == 0:
                continue
            pos = s > 0
            kl = (a - float((s[pos] * (np.log(s[pos]) - np.log(n))).sum())) / n  # no underflow of s/n
            scores.append(np.exp(kl))
        if not scores:
            raise MetricError("Inception Score: no images")
        return float(np.mean(scores))


def inception_score(logits: Array, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of unbiased logits [N, C] (consecutive splits, no shuffling, mean only)."""
    z = torch.as_tensor(logits)
    if not bool(torch.isfinite(z).all()):
        raise MetricError("Inception Score: the logits contain NaN or Inf (bad images or a broken network?)")
    sums = InceptionScoreSums(z.shape[0], z.shape[1], split_size)
    sums.update(z, 0)
    return sums.score()
