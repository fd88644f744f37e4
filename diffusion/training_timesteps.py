"""Samplers of training timesteps t with importance weights (improved DDPM section 3.3).

sample() returns t ~ p and weights 1 / (T p_t), so that E[w * L_t] equals the uniform average of L_t.
Distributed use: each rank gathers the (t, loss) lists of all ranks (launch.runtime.dist.all_gather_object)
and passes the concatenation to update_with_all_losses, so every rank keeps the same history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusion.schedules import DiffusionError

HISTORY_PER_TERM = 10
UNIFORM_PROB = 0.001

UNIFORM = "uniform"
LOSS_SECOND_MOMENT = "loss-second-moment"
SAMPLER_NAMES = (UNIFORM, LOSS_SECOND_MOMENT)


class ScheduleSampler:
    """Base class: a distribution over the T timesteps given by weights()."""

    def __init__(self, num_timesteps: int | Any) -> None:
        # accepts the step count or a diffusion object (ADM passes the diffusion)
        self.num_timesteps = int(getattr(num_timesteps, "num_timesteps", num_timesteps))

    def weights(self) -> np.ndarray:
        """Unnormalised sampling weights [T], float64."""
        return np.ones(self.num_timesteps, dtype=np.float64)

    def probabilities(self) -> np.ndarray:
        w = self.weights()
        return w / w.sum()

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(t LongTensor [B], importance weights float32 [B]) on `device`; generator=None: global RNG."""
        p = torch.from_numpy(self.probabilities())
        indices = torch.multinomial(p, batch_size, replacement=True, generator=generator)  # [B] CPU
        weights = 1.0 / (self.num_timesteps * p[indices])
        return indices.to(device), weights.to(device=device, dtype=torch.float32)

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Record losses of all ranks (no-op for samplers that ignore losses)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class UniformSampler(ScheduleSampler):
    """t ~ U{0, ..., T-1}; all weights 1."""


class LossSecondMomentResampler(ScheduleSampler):
    """p_t proportional to sqrt(E[L_t^2]) over the last `history_per_term` losses at t, mixed with
    `uniform_prob` of the uniform distribution; uniform until every t has a full history."""

    def __init__(
        self,
        num_timesteps: int | Any,
        history_per_term: int = HISTORY_PER_TERM,
        uniform_prob: float = UNIFORM_PROB,
    ) -> None:
        super().__init__(num_timesteps)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros((self.num_timesteps, history_per_term), dtype=np.float64)
        self._loss_counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Append each (t, loss); a full history drops its oldest entry."""
        if len(ts) != len(losses):
            raise DiffusionError(f"update_with_all_losses: {len(ts)} timesteps but {len(losses)} losses")
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = float(loss)
            else:
                self._loss_history[t, self._loss_counts[t]] = float(loss)
                self._loss_counts[t] += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain lists (loadable with torch.load(weights_only=True))."""
        return {"loss_history": self._loss_history.tolist(), "loss_counts": self._loss_counts.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = np.asarray(state["loss_history"], dtype=np.float64)
        counts = np.asarray(state["loss_counts"], dtype=np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise DiffusionError(
                f"timestep sampler state has shape {history.shape}, expected {self._loss_history.shape}"
            )
        self._loss_history, self._loss_counts = history, counts


def create_named_schedule_sampler(name: str, num_timesteps: int | Any) -> ScheduleSampler:
    """ "uniform" or "loss-second-moment" for a diffusion with `num_timesteps` steps."""
    if name == UNIFORM:
        return UniformSampler(num_timesteps)
    if name == LOSS_SECOND_MOMENT:
        return LossSecondMomentResampler(num_timesteps)
    raise DiffusionError(f"unknown timestep sampler {name!r}; choose from {', '.join(SAMPLER_NAMES)}")
