"""Independent reference formulas (numpy float64, written from the papers) shared by the diffusion tests."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch


def _linear_alpha_bar(num_steps: int) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), betas evenly spaced 1e-4 .. 0.02 (x 1000/T), as a plain loop."""
    scale = 1000.0 / num_steps
    lo, hi = 1e-4 * scale, 0.02 * scale
    out, prod = [], 1.0
    for i in range(num_steps):
        beta = lo + (hi - lo) * i / (num_steps - 1)
        prod *= 1.0 - beta
        out.append(prod)
    return np.array(out)


def _adm_section_steps(num_steps: int, counts: list[int]) -> list[int]:
    """ADM's section rule in closed form: section i of size L keeps start + round(j * (L-1)/(n-1))."""
    sizes = [num_steps // len(counts) + (1 if i < num_steps % len(counts) else 0) for i in range(len(counts))]
    kept, start = [], 0
    for size, n in zip(sizes, counts):
        kept += [start + (round(j * (size - 1) / (n - 1)) if n > 1 else 0) for j in range(n)]
        start += size
    return sorted(set(kept))


def _respaced(alpha_bar_orig: np.ndarray, kept: list[int]) -> dict[str, np.ndarray]:
    """Per kept step k: abar_k, abar_{k-1}, beta_k, posterior variance, clipped log variance, coefficients."""
    abar = alpha_bar_orig[kept]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1.0 - abar / abar_prev
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
    post_log_var = np.log(np.where(np.arange(len(kept)) == 0, post_var[1], post_var))
    coef_x0 = beta * np.sqrt(abar_prev) / (1.0 - abar)
    coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - beta) / (1.0 - abar)
    return dict(
        abar=abar,
        abar_prev=abar_prev,
        beta=beta,
        post_var=post_var,
        post_log_var=post_log_var,
        coef_x0=coef_x0,
        coef_xt=coef_xt,
    )


def _rel_err(ours, ref, scale=None) -> float:
    """max |ours - ref| / |scale| (scale defaults to |ref|; exact zeros in ref must be matched exactly)."""
    ours = ours.detach().double().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ref = np.asarray(ref, dtype=np.float64)
    scale = np.abs(ref) if scale is None else np.abs(np.asarray(scale, dtype=np.float64))
    diff = np.abs(ours - ref)
    zero = scale == 0
    if np.any(diff[zero] != 0):
        return math.inf
    return float(np.max(diff[~zero] / scale[~zero])) if np.any(~zero) else 0.0


@pytest.fixture
def ref() -> SimpleNamespace:
    """Reference formulas for the tests."""
    return SimpleNamespace(
        linear_alpha_bar=_linear_alpha_bar,
        adm_section_steps=_adm_section_steps,
        respaced=_respaced,
        rel_err=_rel_err,
    )


@pytest.fixture
def make_noise_fn():
    """Factory: seed -> noise_fn(like) drawing from a private CPU generator (never the global RNG)."""

    def factory(seed: int):
        gen = torch.Generator().manual_seed(seed)

        def noise_fn(like: torch.Tensor) -> torch.Tensor:
            return torch.randn(like.shape, generator=gen, dtype=torch.float32).to(like)

        return noise_fn

    return factory
