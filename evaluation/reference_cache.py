"""Reference statistics: stored in the file, cached by content, or computed once from arr_0.

ADM's rule: `mu`/`sigma` (`mu_s`/`sigma_s`, `mu_dinov2`/`sigma_dinov2`) stored in a reference batch are used as
they are; whatever else is needed (statistics not stored, per-image features for precision/recall) comes from
one pass over arr_0 through the networks that give it, cached under `--cache-dir` per network, by a cheap
identity of the file and that network's weights (and, for DINOv2, its resize mode), so the next evaluation
against the same reference skips that network's pass. The Inception part of the cache is what it always was.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evaluation.batches import STATISTICS_KEYS, ImageBatch
from evaluation.features import POOL, BatchFeatures, FeatureAccumulator, FeatureExtractor, extract_batch
from evaluation.inputs import CheckedBatch, Gaussian
from evaluation.metrics import FRECHET_FEATURES, MANIFOLD_FEATURES
from evaluation.networks import cache_tag, combine, networks_of
from launch.runtime import dist
from launch.runtime.files import FileWriteError, atomic_write

CACHE_VERSION = 1  # bump when extraction changes what a cached reference holds
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dit-fid" / "reference"
FEATURES_SUFFIX = "_features"  # pool_features, dinov2_features: per-image rows kept for precision/recall
POOL_FEATURES_KEY = POOL + FEATURES_SUFFIX
COUNT_KEY = "count"
GIVEN, COMPUTED = "given in the file", "computed"
FRECHET_KINDS = frozenset(FRECHET_FEATURES.values())
MANIFOLD_KINDS = frozenset(MANIFOLD_FEATURES.values())


@dataclass
class Reference:
    """What the metrics need of the reference batch."""

    num_images: int | None  # None: a file of statistics only
    statistics: dict[str, Gaussian]  # "pool" / "spatial" / "dinov2" -> (mu, sigma), for the distances asked for
    features: dict[str, np.ndarray | torch.Tensor] = field(default_factory=dict)  # kind -> [N, D], precision/recall
    source: str = COMPUTED  # how the statistics were obtained

    @property
    def pool_features(self) -> np.ndarray | torch.Tensor | None:
        return self.features.get(POOL)


def content_key(path: Path, weights: object, tag: str = "") -> str:
    """Cheap identity of a batch + a network's weights file (`weights.path`) and `tag` (what else changes the
    features): zip member names/CRCs/sizes (or PNG names/sizes/mtimes)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    w = weights.path.resolve()
    st = w.stat()
    h.update(f"{w}|{st.st_size}|{st.st_mtime_ns}".encode())
    if tag:
        h.update(f"|{tag}".encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            s = f.stat()
            h.update(f"{f.name}|{s.st_size}|{s.st_mtime_ns}".encode())
    else:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                h.update(f"{info.filename}|{info.CRC}|{info.file_size}".encode())
    return h.hexdigest()[:32]


def reference_cache_file(cache_dir: Path, path: Path, weights: object, tag: str = "") -> Path:
    """Where the arr_0 statistics and features of reference batch `path` by one network are cached."""
    return cache_dir / f"{content_key(path, weights, tag)}.npz"


def network_cache_file(cache_dir: Path, path: Path, network: FeatureExtractor) -> Path:
    return reference_cache_file(cache_dir, path, network.weights, cache_tag(network))


def _load_cache(file: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def cache_reference(cache_dir: Path, path: Path, weights: object, stats: Mapping[str, np.ndarray],
                    tag: str = "") -> None:
    """Store `reference_stats` of exactly the images of `path`'s arr_0; a failed write only warns."""
    try:
        with atomic_write(reference_cache_file(cache_dir, path, weights, tag)) as f:
            np.savez(f, **stats)
    except FileWriteError as exc:
        warnings.warn(f"could not cache reference statistics: {exc}", stacklevel=2)


def network_stats(stats: Mapping[str, np.ndarray], network: FeatureExtractor) -> dict[str, np.ndarray]:
    """The part of `reference_stats` that `network` gives (its statistics and feature rows, and the count)."""
    keys = {COUNT_KEY}
    for kind in network.feature_dims:
        keys.update(STATISTICS_KEYS.get(kind, ()))
        keys.add(kind + FEATURES_SUFFIX)
    return {k: v for k, v in stats.items() if k in keys}


def cache_networks(cache_dir: Path, path: Path, extractor: FeatureExtractor, stats: Mapping[str, np.ndarray]) -> None:
    """One cache file per network of `extractor`, each with that network's part of `stats`."""
    for net in networks_of(extractor):
        cache_reference(cache_dir, path, net.weights, network_stats(stats, net), cache_tag(net))


def reference_stats(got: BatchFeatures) -> dict[str, np.ndarray]:
    """What the reference cache holds: count, mu, sigma, mu_s, sigma_s, mu_dinov2, sigma_dinov2 (those summed)
    and `<kind>_features` (those kept)."""
    stats: dict[str, np.ndarray] = {}
    for kind, summed in got.statistics().items():
        mu_key, sigma_key = STATISTICS_KEYS[kind]
        stats[COUNT_KEY] = np.array(summed.count)
        stats[mu_key], stats[sigma_key] = summed.mean(), summed.cov(f"reference {kind}")
    for kind, rows in got.rows.items():
        stats[kind + FEATURES_SUFFIX] = rows.cpu().numpy()
    return stats


def reference_accumulator(extractor: FeatureExtractor, num_images: int) -> FeatureAccumulator:
    """What a reference pass computes: every Frechet statistic its networks give, and the per-image features
    of precision/recall (pool_3 and/or DINOv2's), so one cached pass serves every metric."""
    dims = extractor.feature_dims
    return FeatureAccumulator(extractor, num_images, stats=[k for k in dims if k in FRECHET_KINDS],
                              inception_score=False, keep=[k for k in dims if k in MANIFOLD_KINDS])


def _extract_reference(batch: ImageBatch, extractor: FeatureExtractor, chunk_size: int) -> dict[str, np.ndarray]:
    accumulator = reference_accumulator(extractor, batch.num_images)
    return reference_stats(extract_batch(batch, accumulator, chunk_size, f"reference {batch.path}"))


def load_reference(ref: CheckedBatch, metrics: Iterable[str], extractor: FeatureExtractor, cache_dir: Path | None,
                   chunk_size: int) -> Reference:
    """The reference statistics and features `metrics` need: given ones win, then the cache, then arr_0 (one
    pass through the networks whose part is not cached). A collective: rank 0 reads the cache and shares what
    it found, so every rank takes the same path."""
    metrics = set(metrics)
    batch = ref.batch
    wanted = {FRECHET_FEATURES[m] for m in metrics if m in FRECHET_FEATURES}
    statistics = {kind: ref.given[kind] for kind in wanted if kind in ref.given}
    rows_wanted = {MANIFOLD_FEATURES[m] for m in metrics if m in MANIFOLD_FEATURES}
    missing = (wanted - set(statistics)) | rows_wanted
    num_images = batch.num_images if batch.has_images else None
    if not missing:
        return Reference(num_images, statistics, {}, GIVEN if statistics else COMPUTED)
    nets = [net for net in networks_of(extractor) if set(net.feature_dims) & missing]
    files = [network_cache_file(cache_dir, batch.path, net) if cache_dir else None for net in nets]
    found = dist.rank0_shares(lambda: [_load_cache(f) if f is not None and f.is_file() else None for f in files])
    todo = [net for net, hit in zip(nets, found) if hit is None]
    cached: dict[str, np.ndarray] = {}
    for hit in found:
        cached.update(hit or {})
    if todo:
        computed = _extract_reference(batch, combine(todo), chunk_size)
        if cache_dir is not None and dist.is_main():
            for net in todo:
                cache_reference(cache_dir, batch.path, net.weights, network_stats(computed, net), cache_tag(net))
        cached.update(computed)
    hits = [f for f, hit in zip(files, found) if hit is not None]
    extracted = COMPUTED if todo else f"cached ({', '.join(str(f) for f in hits)})"
    for kind in wanted - set(statistics):
        mu_key, sigma_key = STATISTICS_KEYS[kind]
        statistics[kind] = (cached[mu_key], cached[sigma_key])
    features = {kind: cached[kind + FEATURES_SUFFIX] for kind in rows_wanted}
    source = GIVEN if ref.given else extracted
    return Reference(num_images, statistics, features, source)
