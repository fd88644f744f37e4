"""Timestep respacing: sample with a subset of the training timesteps (improved DDPM section 4).

A kept subset S = {s_0 < s_1 < ...} of the T training steps defines a new process with
beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}; the model still sees the ORIGINAL timesteps s_k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.loop import ModelFn
from diffusion.schedules import DiffusionError

DDIM_PREFIX = "ddim"


def _parse_section_counts(spec: str) -> list[int]:
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise DiffusionError(
            f"bad timestep respacing {spec!r}: expected a step count like '250', 'ddim50' or '10,20,30'"
        ) from None
    if any(c < 0 for c in counts) or sum(counts) == 0:
        raise DiffusionError(f"bad timestep respacing {spec!r}: counts must be >= 0 with a positive total")
    return counts


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Kept original timesteps (sorted) for a respacing spec.

    "ddimN": range(0, T, stride) for the smallest integer stride giving exactly N steps (DDIM paper).
    "N" or "n1,n2,...": T is cut into len(counts) equal sections (the first T % len get one extra step);
    section i of size L keeps count_i steps at start + round(j * (L - 1) / (count_i - 1)).
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith(DDIM_PREFIX):
            try:
                desired = int(section_counts[len(DDIM_PREFIX) :])
            except ValueError:
                raise DiffusionError(f"bad timestep respacing {section_counts!r}: expected 'ddimN'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise DiffusionError(
                f"timestep respacing {section_counts!r}: no integer stride gives exactly {desired} of "
                f"{num_timesteps} steps"
            )
        counts = _parse_section_counts(section_counts)
    else:
        counts = [int(c) for c in section_counts]
        if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
            raise DiffusionError(f"bad timestep respacing {list(section_counts)!r}")

    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise DiffusionError(
                f"timestep respacing: cannot take {count} steps from a section of {size} steps"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # accumulate the fractional index exactly as ADM does (same float rounding, same kept steps)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class _TimestepMappedModel:
    """Calls the model with original timesteps: model(x, timestep_map[t], **kwargs), the map kept on t's device."""

    def __init__(self, model: ModelFn, diffusion: SpacedDiffusion) -> None:
        self.model = model
        self.diffusion = diffusion

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Any:
        return self.model(x, self.diffusion.original_timesteps(t), **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process over a subset of a base process's timesteps (use_timesteps)."""

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        self.use_timesteps = set(int(t) for t in use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        if (
            not self.use_timesteps
            or min(self.use_timesteps) < 0
            or max(self.use_timesteps) >= base.num_timesteps
        ):
            raise DiffusionError(f"kept timesteps must lie in 0..{base.num_timesteps - 1}")
        kept = sorted(self.use_timesteps)
        kept_alpha_bar = base.alphas_cumprod[kept]
        previous = np.append(1.0, kept_alpha_bar[:-1])
        kwargs["betas"] = 1.0 - kept_alpha_bar / previous  # beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}
        super().__init__(**kwargs)
        self.timestep_map = kept
        self.timestep_map_array = np.array(kept, dtype=np.int64)

    def original_timesteps(self, t: Tensor) -> Tensor:
        """timestep_map[t] for step indices t [B], on t's device (the map is copied there once)."""
        return self._table("timestep_map_array", t.device, t.dtype)[t]

    def _wrap_model(self, model: ModelFn) -> ModelFn:
        """The model called with original timesteps (p_mean_variance and training_losses take step indices)."""
        if isinstance(model, _TimestepMappedModel):
            return model
        return _TimestepMappedModel(model, self)
