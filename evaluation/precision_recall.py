"""ADM's improved precision and recall (Kynkaanniemi et al. 2019, k = 3) on the evaluation device.

A point lies on a set's manifold when its squared distance to some point of that set is <= that point's k-th
nearest-neighbour squared distance (the point itself counts as the 0th). Precision = share of samples on the
reference manifold, recall = share of reference images on the sample manifold.

Distances are float32 max(|a|^2 - 2 a.b + |b|^2, 0) in [row_block, col_block] blocks; the k+1 smallest per row
come from `torch.topk`, memberships from comparisons, all on the device. ADM computes the distances in float16
(float32 only when float16 overflows), so a point within float16 round-off of a ball's boundary may count
differently. Under torchrun every rank holds both feature sets and computes its contiguous share of the rows;
one process is the same code with a share of everything.
"""

from __future__ import annotations

import numpy as np
import torch

from evaluation.errors import MetricError
from evaluation.inception import full_precision
from launch.runtime import dist
from launch.runtime.partition import share_bounds

NEAREST_K = 3
ROW_BLOCK = 1024
COL_BLOCK = 10000

Rows = tuple[int, int]


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances [A, B] in float32: max(|a|^2 - 2 a.b + |b|^2, 0)."""
    norm_a = torch.linalg.vector_norm(a, dim=1).square()[:, None]  # no [A, D] temporaries
    norm_b = torch.linalg.vector_norm(b, dim=1).square()[None, :]
    return (a @ b.T).mul_(-2.0).add_(norm_a).add_(norm_b).clamp_min_(0.0)


def knn_radii(features: torch.Tensor, k: int = NEAREST_K, rows: Rows | None = None,
              row_block: int = ROW_BLOCK, col_block: int = COL_BLOCK) -> torch.Tensor:
    """Squared distance of rows `rows` (default all) to their k-th nearest neighbour among all `features`
    [N, D] (self = 0th) -> [R] float32 on the features' device. Memory: one [row_block, col_block] block."""
    n = features.shape[0]
    if n <= k:
        raise MetricError(f"precision/recall need more than {k} images per set, got {n}")
    start, stop = rows if rows is not None else (0, n)
    radii = torch.empty(stop - start, dtype=torch.float32, device=features.device)
    for r0 in range(start, stop, row_block):
        r1 = min(stop, r0 + row_block)
        best = None  # [rows, <= k+1] smallest distances so far, ascending
        for c0 in range(0, n, col_block):
            block = squared_distances(features[r0:r1], features[c0: c0 + col_block])
            pool = block if best is None else torch.cat([best, block], dim=1)
            best = torch.topk(pool, min(k + 1, pool.shape[1]), dim=1, largest=False).values
        radii[r0 - start: r1 - start] = best[:, k]
    return radii


def manifold_coverage(ref: torch.Tensor, ref_radii: torch.Tensor, sample: torch.Tensor, sample_radii: torch.Tensor,
                      ref_rows: Rows | None = None, row_block: int = ROW_BLOCK,
                      col_block: int = COL_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Which points lie inside the other set's k-NN balls, from one pass over reference x sample distances.

    Returns (ref_in [rows of ref_rows] bool: inside some sample ball -> recall,
             sample_in [all samples] bool: inside some ball of these reference rows -> precision).
    """
    start, stop = ref_rows if ref_rows is not None else (0, ref.shape[0])
    ref_in = torch.zeros(stop - start, dtype=torch.bool, device=ref.device)
    sample_in = torch.zeros(sample.shape[0], dtype=torch.bool, device=ref.device)
    for r0 in range(start, stop, row_block):
        r1 = min(stop, r0 + row_block)
        for c0 in range(0, sample.shape[0], col_block):
            c1 = min(sample.shape[0], c0 + col_block)
            d = squared_distances(ref[r0:r1], sample[c0:c1])  # [rows, cols]
            ref_in[r0 - start: r1 - start] |= (d <= sample_radii[None, c0:c1]).any(dim=1)
            sample_in[c0:c1] |= (d <= ref_radii[r0:r1, None]).any(dim=0)
    return ref_in, sample_in


def _checked(name: str, features: np.ndarray | torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(features).to(device, torch.float32).contiguous()
    if x.shape[0] <= k:
        raise MetricError(f"precision/recall need more than {k} {name} images, got {x.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise MetricError(f"{name} pool_3 features contain NaN or Inf")
    return x


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Each rank's contiguous share, concatenated in rank order (= global order), on the local device."""
    parts = dist.all_gather_tensor(local.to(dist.info().device)) if dist.world_size() > 1 else [local]
    return torch.cat([p.to(local.device) for p in parts])


def manifold_membership(ref: np.ndarray | torch.Tensor, sample: np.ndarray | torch.Tensor, k: int = NEAREST_K,
                        device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-point decisions (sample_on_ref_manifold [Ns] bool, ref_on_sample_manifold [Nr] bool) of pool_3
    features ref [Nr, D] and sample [Ns, D], every rank holding both. A collective; the same on every rank."""
    device = torch.device(device) if device is not None else dist.info().device
    ref_t, sample_t = _checked("reference", ref, k, device), _checked("sample", sample, k, device)
    ref_rows = share_bounds(ref_t.shape[0], dist.rank(), dist.world_size())
    sample_rows = share_bounds(sample_t.shape[0], dist.rank(), dist.world_size())
    with torch.inference_mode(), full_precision(device):
        ref_radii = _gather_rows(knn_radii(ref_t, k, ref_rows))
        sample_radii = _gather_rows(knn_radii(sample_t, k, sample_rows))
        ref_in, sample_in = manifold_coverage(ref_t, ref_radii, sample_t, sample_radii, ref_rows)
        ref_in = _gather_rows(ref_in.to(torch.uint8))
        covered = dist.all_reduce_sum(sample_in.to(dist.info().device, torch.int32))  # OR over the ranks
    return covered.cpu().numpy() > 0, ref_in.cpu().numpy() > 0


def precision_recall(ref: np.ndarray | torch.Tensor, sample: np.ndarray | torch.Tensor, k: int = NEAREST_K,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """ADM's (precision, recall) of sample features against reference features, both [N, D]. A collective."""
    sample_on_ref, ref_on_sample = manifold_membership(ref, sample, k, device)
    return float(sample_on_ref.mean()), float(ref_on_sample.mean())
