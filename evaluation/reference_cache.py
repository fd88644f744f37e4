"""Reference statistics: stored in the file, cached by content, or computed once from arr_0.

ADM's rule: `mu`/`sigma` (`mu_s`/`sigma_s`) stored in a reference batch are used as they are; whatever else
is needed (statistics not stored, pool_3 features for precision/recall) comes from one Inception pass over
arr_0, cached under `--cache-dir` by a cheap identity of the file and the weights, so the next evaluation
against the same reference skips that pass.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.batches import STATISTICS_KEYS, ImageBatch
from evaluation.features import POOL, BatchFeatures, FeatureAccumulator, FeatureExtractor, extract_batch
from evaluation.inception import InceptionWeights
from evaluation.inputs import CheckedBatch, Gaussian
from evaluation.metrics import FRECHET_FEATURES, MANIFOLD_METRICS
from launch.runtime import dist
from launch.runtime.files import FileWriteError, atomic_write

CACHE_VERSION = 1  # bump when extraction changes what a cached reference holds
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dit-fid" / "reference"
POOL_FEATURES_KEY = "pool_features"
GIVEN, COMPUTED = "given in the file", "computed"


@dataclass
class Reference:
    """What the metrics need of the reference batch."""

    num_images: int | None  # None: a file of statistics only
    statistics: dict[str, Gaussian]  # "pool" / "spatial" -> (mu, sigma), for the Frechet distances asked for
    pool_features: np.ndarray | torch.Tensor | None  # [N, 2048], for precision/recall
    source: str  # how the statistics were obtained


def content_key(path: Path, weights: InceptionWeights) -> str:
    """Cheap identity of a batch + weights: zip member names/CRCs/sizes (or PNG names/sizes/mtimes)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    w = weights.path.resolve()
    st = w.stat()
    h.update(f"{w}|{st.st_size}|{st.st_mtime_ns}".encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            s = f.stat()
            h.update(f"{f.name}|{s.st_size}|{s.st_mtime_ns}".encode())
    else:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                h.update(f"{info.filename}|{info.CRC}|{info.file_size}".encode())
    return h.hexdigest()[:32]


def reference_cache_file(cache_dir: Path, path: Path, weights: InceptionWeights) -> Path:
    """Where the arr_0 statistics and pool_3 features of reference batch `path` are cached."""
    return cache_dir / f"{content_key(path, weights)}.npz"


def _load_cache(file: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def cache_reference(cache_dir: Path, path: Path, weights: InceptionWeights, stats: dict[str, np.ndarray]) -> None:
    """Store `reference_stats` of exactly the images of `path`'s arr_0; a failed write only warns."""
    try:
        with atomic_write(reference_cache_file(cache_dir, path, weights)) as f:
            np.savez(f, **stats)
    except FileWriteError as exc:
        warnings.warn(f"could not cache reference statistics: {exc}", stacklevel=2)


def reference_stats(got: BatchFeatures) -> dict[str, np.ndarray]:
    """What the reference cache holds: count, mu, sigma, mu_s, sigma_s (and pool_features when kept)."""
    stats = {"count": np.array(got.pool.count), "mu": got.pool.mean(), "sigma": got.pool.cov("reference pool_3"),
             "mu_s": got.spatial.mean(), "sigma_s": got.spatial.cov("reference spatial")}
    if POOL in got.rows:
        stats[POOL_FEATURES_KEY] = got.rows[POOL].cpu().numpy()
    return stats


def _extract_reference(batch: ImageBatch, extractor: FeatureExtractor, chunk_size: int) -> dict[str, np.ndarray]:
    accumulator = FeatureAccumulator(extractor, batch.num_images, inception_score=False, keep=(POOL,))
    return reference_stats(extract_batch(batch, accumulator, chunk_size, f"reference {batch.path}"))


def load_reference(ref: CheckedBatch, metrics: Iterable[str], extractor: FeatureExtractor, cache_dir: Path | None,
                   chunk_size: int) -> Reference:
    """The reference statistics and features `metrics` need: given ones win, then the cache, then arr_0.
    A collective: rank 0 reads the cache and shares what it found, so every rank takes the same path."""
    metrics = set(metrics)
    batch = ref.batch
    wanted = {FRECHET_FEATURES[m] for m in metrics if m in FRECHET_FEATURES}
    statistics = {kind: ref.given[kind] for kind in wanted if kind in ref.given}
    need_features = bool(metrics & MANIFOLD_METRICS)
    num_images = batch.num_images if batch.has_images else None
    if not need_features and wanted <= set(statistics):
        return Reference(num_images, statistics, None, GIVEN if statistics else COMPUTED)
    cache_file = reference_cache_file(cache_dir, batch.path, extractor.weights) if cache_dir else None
    cached = dist.rank0_shares(lambda: _load_cache(cache_file) if cache_file and cache_file.is_file() else None)
    if cached is None:
        cached = _extract_reference(batch, extractor, chunk_size)
        if cache_file is not None and dist.is_main():
            cache_reference(cache_dir, batch.path, extractor.weights, cached)
        extracted = COMPUTED
    else:
        extracted = f"cached ({cache_file})"
    for kind in wanted - set(statistics):
        mu_key, sigma_key = STATISTICS_KEYS[kind]
        statistics[kind] = (cached[mu_key], cached[sigma_key])
    source = GIVEN if ref.given else extracted
    return Reference(num_images, statistics, cached[POOL_FEATURES_KEY] if need_features else None, source)
