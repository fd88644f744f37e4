"""Bootstrap spread of FID, sFID and the Inception Score: `--bootstrap K`.

Resample k (k = 0..K-1) draws N sample images with replacement, `numpy.random.default_rng([seed, k])
.integers(0, N, N)` (position j of the resample is image idx[j]); the reference stays fixed. Each metric is
recomputed on every resample and the standard deviation (ddof 1) over the K values is reported as
`fid_std`, `sfid_std`, `inception_score_std`. It estimates how much the number would move with another draw
of N images from the same model; it is not the seed-to-seed spread of a training run.

No resample is materialised: a resample's statistics are the per-image features weighted by how often each
image was drawn (running sums, all-reduced over ranks, each rank summing its share of the images); the
Inception Score's consecutive splits of the resample become per-split weights.

Each resample costs a Frechet distance per metric (2048-d: about a second on a CPU), so rank 0 prints a
progress line on stderr every tenth of the resamples: a thousand of them do not look like a hang.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Iterable

import numpy as np
import torch

from evaluation.features import LOGITS, BatchFeatures
from evaluation.frechet import frechet_distance
from evaluation.metrics import FRECHET_FEATURES, JSON_KEYS, METRIC_IS, PRINT_NAMES, STD_SUFFIX
from evaluation.reference_cache import Reference
from evaluation.statistics import IS_SPLIT_SIZE, FeatureStats, FewSamplesWarning, InceptionScoreSums
from launch.runtime import dist
from launch.runtime.errors import UserError
from launch.runtime.partition import share_bounds

BOOTSTRAP_DDOF = 1
MAX_RESAMPLES = 1000  # each resample costs one Frechet distance per metric (seconds on a CPU): a bound, not a hang
MAX_SEED = 2**63 - 1  # numpy's SeedSequence takes non-negative integers
PROGRESS_LINES = 10  # progress lines over a bootstrap: one every tenth of the resamples


class BootstrapError(UserError):
    """--bootstrap or --bootstrap-seed out of range."""


def check_bootstrap(resamples: int, seed: int) -> None:
    """--bootstrap K in [0, MAX_RESAMPLES] and --bootstrap-seed in [0, 2**63): one line, before any work."""
    if not 0 <= resamples <= MAX_RESAMPLES:
        raise BootstrapError(f"--bootstrap {resamples}: give 0 (none) to {MAX_RESAMPLES} resamples (10 already "
                             "give the spread to about 25%)")
    if not 0 <= seed <= MAX_SEED:
        raise BootstrapError(f"--bootstrap-seed {seed}: give a non-negative integer below 2**63")


def progress_line(done: int, total: int, seconds: float) -> str:
    """`bootstrap: 100 of 1000 resamples in 52.1 s (about 469 s left)`."""
    left = seconds / max(done, 1) * (total - done)
    return f"bootstrap: {done} of {total} resamples in {seconds:.1f} s (about {left:.0f} s left)"


def resample_indices(num_images: int, seed: int, resample: int) -> np.ndarray:
    """The images drawn (with replacement) by resample number `resample`: idx [N] in 0..N-1."""
    return np.random.default_rng([seed, resample]).integers(0, num_images, num_images)


def _frechet(rows: torch.Tensor, weights: np.ndarray, reference: tuple[np.ndarray, np.ndarray], name: str) -> float:
    stats = FeatureStats(rows.shape[1], rows.device)
    stats.update(rows, torch.from_numpy(weights))
    stats.reduce()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)  # said once by the metric itself
        return dist.rank0_shares(lambda: frechet_distance(stats.mean(), stats.cov(name), *reference, name=name))


def _inception_score(logits: torch.Tensor, idx: np.ndarray, rows: tuple[int, int], split_size: int) -> float:
    n = idx.shape[0]
    sums = InceptionScoreSums(n, logits.shape[1], split_size, logits.device)
    weights = np.zeros((sums.num_splits, n))  # [S, N]: how often image i sits in split s of the resample
    np.add.at(weights, (np.arange(n) // split_size, idx), 1.0)
    sums.add_weighted(logits, torch.from_numpy(weights[:, rows[0]: rows[1]]))
    return sums.reduce().score()


def bootstrap_spread(reference: Reference, sample: BatchFeatures, metrics: Iterable[str], resamples: int,
                     seed: int = 0, split_size: int = IS_SPLIT_SIZE) -> dict[str, float]:
    """`<metric>_std` over `resamples` seeded resamples of the sample's kept per-image features (the rows
    of `sample.rows` for FID, sFID and the Inception Score; metrics without rows are skipped). A collective."""
    n = sample.num_images
    start, stop = share_bounds(n, dist.rank(), dist.world_size())
    chosen = [m for m in metrics if (m in FRECHET_FEATURES and FRECHET_FEATURES[m] in sample.rows)
              or (m == METRIC_IS and LOGITS in sample.rows)]
    values: dict[str, list[float]] = {m: [] for m in chosen}
    check_bootstrap(resamples, seed)
    every, start_s = max(1, math.ceil(resamples / PROGRESS_LINES)), time.perf_counter()
    for k in range(resamples):
        idx = resample_indices(n, seed, k)
        counts = np.bincount(idx, minlength=n).astype(np.float64)[start:stop]  # this rank's images' weights
        for m in chosen:
            if m == METRIC_IS:
                values[m].append(_inception_score(sample.rows[LOGITS][start:stop], idx, (start, stop), split_size))
            else:
                kind = FRECHET_FEATURES[m]
                values[m].append(_frechet(sample.rows[kind][start:stop], counts, reference.statistics[kind],
                                          PRINT_NAMES[m]))
        if ((k + 1) % every == 0 or k + 1 == resamples) and dist.is_main():
            print(progress_line(k + 1, resamples, time.perf_counter() - start_s), file=sys.stderr, flush=True)
    return {JSON_KEYS[m] + STD_SUFFIX: float(np.std(v, ddof=BOOTSTRAP_DDOF)) for m, v in values.items()}
