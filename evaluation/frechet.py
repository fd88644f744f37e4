"""The Frechet distance between two Gaussians (FID on pool_3, sFID on the spatial features), numpy float64.

FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)) (ADM's `evaluations/evaluator.py`, covariances with
ddof 1); Tr(sqrt(S1 S2)) from one symmetric eigenvalue problem instead of a general matrix square root.
"""

from __future__ import annotations

import numpy as np

from evaluation.errors import MetricError


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


def check_finite(name: str, *arrays: np.ndarray) -> None:
    """MetricError naming `name` when an array holds NaN or Inf."""
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
    check_finite(name, mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    # Cholesky and the symmetric eigensolvers read the lower triangle only: no symmetrised copies needed.
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * sqrt_trace_product(sigma1, sigma2))
