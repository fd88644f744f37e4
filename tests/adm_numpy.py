"""Independent numpy versions of ADM evaluator formulas, for checking ours against."""

from __future__ import annotations

import numpy as np


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
