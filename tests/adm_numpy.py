"""Independent numpy versions of ADM evaluator formulas, for checking ours against."""

from __future__ import annotations

import numpy as np
import scipy.linalg


def is_adm_numpy(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's compute_inception_score, written out: softmax, consecutive splits, exp(mean KL), mean."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i: i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def fid_adm_numpy(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """ADM's frechet_distance of features [N, D] against (mu2, sigma2): np.cov and scipy's sqrtm (real part)."""
    x = features.astype(np.float64)
    mu1, sigma1 = x.mean(0), np.cov(x, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def manifold_decisions_adm_numpy(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """ADM's ManifoldEstimator in float64: k-th neighbour radii by np.partition (self is the 0th), then ball
    membership. Returns (sample on the reference manifold [Ns] bool, reference on the sample manifold [Nr])."""
    def sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = a.astype(np.float64), b.astype(np.float64)
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0)

    ref_radii = np.partition(sq_dist(ref, ref), k, axis=1)[:, k]
    sample_radii = np.partition(sq_dist(sample, sample), k, axis=1)[:, k]
    d = sq_dist(ref, sample)  # [Nr, Ns]
    return (d <= ref_radii[:, None]).any(axis=0), (d <= sample_radii[None, :]).any(axis=1)


def adm_report_numpy(ref: dict[str, np.ndarray], sample: dict[str, np.ndarray], k: int = 3) -> dict[str, float]:
    """ADM's five numbers from per-image features (dicts with pool, spatial, logits rows), all in numpy."""
    def fid(kind: str) -> float:
        x = ref[kind].astype(np.float64)
        return fid_adm_numpy(sample[kind], x.mean(0), np.cov(x, rowvar=False))

    sample_on_ref, ref_on_sample = manifold_decisions_adm_numpy(ref["pool"], sample["pool"], k)
    return {"inception_score": is_adm_numpy(sample["logits"]), "fid": fid("pool"), "sfid": fid("spatial"),
            "precision": float(sample_on_ref.mean()), "recall": float(ref_on_sample.mean())}


def bootstrap_std_numpy(ref: dict[str, np.ndarray], sample: dict[str, np.ndarray], resamples: int, seed: int,
                        split_size: int = 5000) -> dict[str, float]:
    """Standard deviation (ddof 1) of FID, sFID and IS over resamples idx = default_rng([seed, k]).integers(0, N, N)
    of the sample rows, each resample materialised and scored from scratch; the reference is fixed."""
    n = len(sample["pool"])
    values: dict[str, list[float]] = {"fid_std": [], "sfid_std": [], "inception_score_std": []}
    for r in range(resamples):
        idx = np.random.default_rng([seed, r]).integers(0, n, n)
        for key, kind in (("fid_std", "pool"), ("sfid_std", "spatial")):
            x = ref[kind].astype(np.float64)
            values[key].append(fid_adm_numpy(sample[kind][idx], x.mean(0), np.cov(x, rowvar=False)))
        values["inception_score_std"].append(is_adm_numpy(sample["logits"][idx], split_size))
    return {key: float(np.std(v, ddof=1)) for key, v in values.items()}
