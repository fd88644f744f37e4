"""Loss pieces: Gaussian KL, the discretised decoder likelihood, and per-timestep loss weights.

KL and likelihood follow ADM (values in nats; callers divide by log 2 for bits).
Weights are functions of the signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Pixel data live in [-1, 1] on 256 levels: a bin is 2/255 wide, half-width 1/255.
HALF_BIN = 1.0 / 255.0
# Edges of the data range: below/above these the outermost bin extends to -inf/+inf.
EDGE_THRESHOLD = 0.999
LOG_CLAMP_MIN = 1e-12
# tanh approximation of the normal CDF (as in GELU): 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).
GELU_CUBIC_COEF = 0.044715

# Prediction targets the weights know about.
TARGET_EPSILON, TARGET_VELOCITY, TARGET_START_X = "epsilon", "velocity", "x0"
TARGETS = (TARGET_EPSILON, TARGET_VELOCITY, TARGET_START_X)

# Defaults from the papers: Min-SNR (Hang et al. 2023) gamma = 5; P2 (Choi et al. 2022) gamma = 1, k = 1.
DEFAULT_MIN_SNR_GAMMA = 5.0
DEFAULT_P2_GAMMA = 1.0
DEFAULT_P2_K = 1.0

WEIGHTING_NONE, WEIGHTING_MIN_SNR, WEIGHTING_P2 = "none", "min_snr", "p2"
WEIGHTING_KINDS = (WEIGHTING_NONE, WEIGHTING_MIN_SNR, WEIGHTING_P2)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: [B, ...] -> [B]."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(
    mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float, logvar2: Tensor | float
) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats; scalars broadcast."""
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (a if isinstance(a, Tensor) else torch.tensor(a).to(ref) for a in (logvar1, logvar2))
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Fast tanh approximation of the standard normal CDF (the one ADM uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + GELU_CUBIC_COEF * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) for data x in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2), elementwise.

    The outermost bins absorb the tails (DDPM's decoder L_0).
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=LOG_CLAMP_MIN))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=LOG_CLAMP_MIN))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=LOG_CLAMP_MIN))
    return torch.where(
        x < -EDGE_THRESHOLD,
        log_cdf_plus,
        torch.where(x > EDGE_THRESHOLD, log_one_minus_cdf_min, log_cdf_delta),
    )


def snr(alphas_cumprod: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Signal-to-noise ratio SNR = alpha_bar / (1 - alpha_bar) (Kingma et al. 2021)."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight(
    snr_t: Tensor, gamma: float = DEFAULT_MIN_SNR_GAMMA, target: str = TARGET_EPSILON
) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for the MSE on the given prediction target.

    x0 target: min(SNR, g); epsilon target: min(SNR, g) / SNR; velocity target: min(SNR, g) / (SNR + 1).
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if target == TARGET_START_X:
        return clipped
    if target == TARGET_EPSILON:
        return clipped / snr_t
    if target == TARGET_VELOCITY:
        return clipped / (snr_t + 1.0)
    raise ValueError(f"min-SNR weighting: unknown target {target!r}; choose from {', '.join(TARGETS)}")


def p2_weight(snr_t: Tensor, gamma: float = DEFAULT_P2_GAMMA, k: float = DEFAULT_P2_K) -> Tensor:
    """Perception-prioritized weight (Choi et al. 2022): 1 / (k + SNR)^gamma."""
    return 1.0 / (k + snr_t) ** gamma


@dataclass(frozen=True)
class LossWeighting:
    """Which per-timestep weight multiplies the MSE term: "none", "min_snr" (gamma) or "p2" (gamma, k)."""

    kind: str = WEIGHTING_NONE
    gamma: float | None = None
    k: float = DEFAULT_P2_K

    def __post_init__(self) -> None:
        if self.kind not in WEIGHTING_KINDS:
            raise ValueError(
                f"unknown loss weighting {self.kind!r}; choose from {', '.join(WEIGHTING_KINDS)}"
            )

    def weight(self, snr_t: Tensor, target: str) -> Tensor | None:
        """Per-sample weights [B] for SNR values [B]; None when no weighting."""
        if self.kind == WEIGHTING_MIN_SNR:
            gamma = DEFAULT_MIN_SNR_GAMMA if self.gamma is None else self.gamma
            return min_snr_weight(snr_t, gamma, target)
        if self.kind == WEIGHTING_P2:
            gamma = DEFAULT_P2_GAMMA if self.gamma is None else self.gamma
            return p2_weight(snr_t, gamma, self.k)
        return None
