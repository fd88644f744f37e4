"""Features of a batch (Inception's, DINOv2's), accumulated per rank and combined over ranks.

`FeatureAccumulator` is what both the evaluator and a sampling job feed: uint8 NHWC images (numpy, or a torch
tensor on any device) with their global indices, in any order and batch size. It keeps running float64 sums
for FID, sFID and FD_DINOv2, per-split sums for the Inception Score, and, for the kinds asked for, each image's
features (pool_3 or DINOv2's for precision/recall; all of them for a bootstrap or for storing them beside the
images).
`reduce()` combines the ranks: the sums are all-reduced, the kept rows gathered in global index order.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from evaluation.batches import ImageBatch
from evaluation.errors import EvaluationError
from evaluation.inception import InceptionWeights
from evaluation.readahead import read_ahead
from evaluation.statistics import FeatureStats, InceptionScoreSums
from launch.runtime import dist
from launch.runtime.partition import share_bounds

POOL, SPATIAL, LOGITS = "pool", "spatial", "logits"  # the extractor's output keys (Inception)
FEATURES = (POOL, SPATIAL, LOGITS)
DINOV2 = "dinov2"  # DINOv2's CLS feature (evaluation.dinov2)
ALL_FEATURES = (*FEATURES, DINOV2)
Indices = int | Sequence[int] | np.ndarray | torch.Tensor  # an int: consecutive indices from there


class FeatureExtractor(Protocol):
    """What the evaluation needs of a network (`InceptionExtractor`, `DinoV2Extractor`, `FeatureNetworks` of
    several, or a stand-in in tests)."""

    weights: InceptionWeights | None
    device: torch.device
    batch_size: int
    has_logits: bool
    feature_dims: Mapping[str, int]  # pool, spatial (and logits with a classifier) -> width

    def extract(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]: ...


@dataclass
class BatchFeatures:
    """A whole batch's features, combined over ranks: what its metrics are computed from."""

    num_images: int
    pool: FeatureStats | None = None
    spatial: FeatureStats | None = None
    inception: InceptionScoreSums | None = None
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> [N, D] in global index order
    dinov2: FeatureStats | None = None

    def statistics(self) -> dict[str, FeatureStats]:
        """kind -> the summed statistics this batch has (for its Frechet distances)."""
        stats = {POOL: self.pool, SPATIAL: self.spatial, DINOV2: self.dinov2}
        return {kind: s for kind, s in stats.items() if s is not None}


def _index_tensor(indices: Indices, count: int, device: torch.device) -> torch.Tensor:
    if isinstance(indices, (int, np.integer)):
        return torch.arange(int(indices), int(indices) + count, device=device)
    idx = (indices.to(torch.int64) if isinstance(indices, torch.Tensor)
           else torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)))
    if idx.shape != (count,):
        raise EvaluationError(f"{count} images given with {tuple(idx.shape)} indices")
    return idx.to(device)


class FeatureAccumulator:
    """One rank's share of a batch of `num_images` images (global indices 0..num_images-1).

    `stats`: the feature kinds summed for a Frechet distance; `inception_score`: per-split logit sums (only
    when the extractor has a classifier); `keep`: the kinds kept per image. The defaults keep everything.
    """

    def __init__(self, extractor: FeatureExtractor, num_images: int, *, stats: Iterable[str] = (POOL, SPATIAL),
                 inception_score: bool = True, keep: Iterable[str] = ALL_FEATURES):
        self.extractor, self.num_images = extractor, num_images
        dims, device = extractor.feature_dims, extractor.device
        self.stats = {kind: FeatureStats(dims[kind], device) for kind in stats}
        self.inception = (InceptionScoreSums(num_images, dims[LOGITS], device=device)
                          if inception_score and LOGITS in dims else None)
        self.keep = [kind for kind in keep if kind in dims]
        self.count = 0  # images added on this rank
        self._indices: list[torch.Tensor] = []
        self._rows: dict[str, list[torch.Tensor]] = {kind: [] for kind in self.keep}

    def add_images(self, images: np.ndarray | torch.Tensor, indices: Indices) -> None:
        """Run uint8 NHWC images [B, H, W, 3] with global `indices` through the network and add them."""
        self.add_features(self.extractor.extract(images), indices)

    def add_features(self, features: Mapping[str, torch.Tensor], indices: Indices) -> None:
        """Add features already extracted (e.g. stored beside the images by an interrupted run)."""
        count = next(iter(features.values())).shape[0]
        idx = _index_tensor(indices, count, self.extractor.device)
        for kind, stats in self.stats.items():
            stats.update(features[kind])
        if self.inception is not None:
            self.inception.update(features[LOGITS], idx)
        if self.keep:
            self._indices.append(idx)
            for kind in self.keep:
                self._rows[kind].append(features[kind].to(self.extractor.device, torch.float32))
        self.count += count

    def local_rows(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's kept features so far: global indices [n] and kind -> rows [n, D]."""
        device = self.extractor.device
        idx = torch.cat(self._indices) if self._indices else torch.zeros(0, dtype=torch.int64, device=device)
        rows = {kind: torch.cat(parts) if parts else torch.zeros(0, self.extractor.feature_dims[kind], device=device)
                for kind, parts in self._rows.items()}
        return idx, rows

    def reduce(self) -> BatchFeatures:
        """Combine every rank's share: sums all-reduced, kept rows gathered in index order. A collective."""
        sums = {kind: stats.reduce() for kind, stats in self.stats.items()}
        result = BatchFeatures(self.num_images, pool=sums.get(POOL), spatial=sums.get(SPATIAL),
                               inception=self.inception.reduce() if self.inception else None, dinov2=sums.get(DINOV2))
        if self.keep:
            idx, rows = self.local_rows()
            result.rows = {kind: _gather_by_index(idx, part, self.num_images) for kind, part in rows.items()}
        return result


def _gather_by_index(indices: torch.Tensor, rows: torch.Tensor, num_images: int) -> torch.Tensor:
    """Every rank's (indices, rows) put in global order [num_images, D]; each index must come exactly once."""
    if dist.world_size() > 1:
        device = dist.info().device
        indices = torch.cat(dist.all_gather_tensor(indices.to(device)))
        rows = torch.cat(dist.all_gather_tensor(rows.to(device)))
    seen = torch.zeros(num_images, dtype=torch.int64, device=indices.device).index_add_(
        0, indices, torch.ones_like(indices))
    if not bool((seen == 1).all()):
        missing, repeated = int((seen == 0).sum()), int((seen > 1).sum())
        raise EvaluationError(f"features of {num_images} images expected: {missing} missing, {repeated} repeated")
    out = torch.empty(num_images, rows.shape[1], dtype=rows.dtype, device=rows.device)
    out[indices] = rows
    return out


def extract_chunks(chunks: Iterable[np.ndarray], rows: tuple[int, int], accumulator: FeatureAccumulator,
                   label: str = "images") -> None:
    """Add this rank's chunks, global rows rows[0] .. rows[1]-1 in order (read ahead on a thread)."""
    start, stop = rows
    done, t0 = 0, time.perf_counter()
    for chunk in read_ahead(chunks):
        accumulator.add_images(chunk, start + done)
        done += chunk.shape[0]
    seconds = time.perf_counter() - t0
    if dist.world_size() > 1 or done:
        prefix = f"[rank {dist.rank()}] " if dist.world_size() > 1 else ""
        print(f"{prefix}{label}: {done} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} images/s)",
              file=sys.stderr, flush=True)
    if done != stop - start:
        raise EvaluationError(f"{label}: read {done} images where {stop - start} were expected")


def extract_batch(batch: ImageBatch, accumulator: FeatureAccumulator, chunk_size: int, label: str) -> BatchFeatures:
    """Run this rank's contiguous share of `batch` through `accumulator` and combine the ranks. A collective."""
    rows = share_bounds(batch.num_images, dist.rank(), dist.world_size())
    extract_chunks(batch.iter_chunks(chunk_size, *rows), rows, accumulator, label)
    return accumulator.reduce()
