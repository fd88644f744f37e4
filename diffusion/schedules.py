"""Noise schedules: the betas of the forward process q(x_t | x_{t-1}) = N(sqrt(1-beta_t) x_{t-1}, beta_t I).

Arrays are float64 numpy, as in ADM; they are cast to float32 tensors only where used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# Ho et al. 2020: linear betas for a 1000-step process, rescaled for other step counts.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
REFERENCE_NUM_STEPS = 1000

# Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas capped at 0.999.
COSINE_OFFSET_S = 0.008
MAX_BETA = 0.999

LINEAR = "linear"
COSINE = "cosine"
# DiT's name for the cosine schedule (the "v2" cap is the 0.999 clip).
COSINE_DIT_NAME = "squaredcos_cap_v2"
SCHEDULE_NAMES = (LINEAR, COSINE, COSINE_DIT_NAME)


class DiffusionError(ValueError):
    """A bad diffusion setting (schedule, respacing, missing noise source); the message is one line."""


def linear_betas(num_steps: int) -> np.ndarray:
    """Linear betas from 1e-4 to 0.02, scaled by 1000/num_steps (same end noise level for any T)."""
    scale = REFERENCE_NUM_STEPS / num_steps
    return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_steps, dtype=np.float64)


def cosine_alpha_bar(t: float) -> float:
    """alpha_bar at continuous time t in [0, 1] (improved DDPM eq. 17, without the f(0) normalisation)."""
    return math.cos((t + COSINE_OFFSET_S) / (1 + COSINE_OFFSET_S) * math.pi / 2) ** 2


def betas_for_alpha_bar(
    num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = MAX_BETA
) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1]: beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T)."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


def cosine_betas(num_steps: int) -> np.ndarray:
    """Cosine schedule betas, clipped at 0.999."""
    return betas_for_alpha_bar(num_steps, cosine_alpha_bar)


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Betas [num_steps] float64 for "linear" or "cosine" (alias "squaredcos_cap_v2")."""
    if num_steps < 1:
        raise DiffusionError(f"diffusion steps must be >= 1, got {num_steps}")
    if name == LINEAR:
        return linear_betas(num_steps)
    if name in (COSINE, COSINE_DIT_NAME):
        return cosine_betas(num_steps)
    raise DiffusionError(f"unknown noise schedule {name!r}; choose from {', '.join(SCHEDULE_NAMES)}")
