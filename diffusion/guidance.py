"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a class-conditional model function.

eps~ = eps(x, null) + s * (eps(x, y) - eps(x, null)); the null label is index `num_classes`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusion.schedules import DiffusionError

ModelFn = Callable[..., Tensor]

CHANNELS_FIRST3 = "first3"  # the DiT paper's numbers: guidance on the first 3 latent channels only
CHANNELS_ALL = "all"  # the standard form
CHANNEL_MODES = (CHANNELS_FIRST3, CHANNELS_ALL)
DIT_GUIDED_CHANNELS = 3


def guided_model(
    model: ModelFn,
    cfg_scale: float,
    num_classes: int,
    channels: str = CHANNELS_FIRST3,
    interval: tuple[float, float] | None = None,
) -> ModelFn:
    """A model function fn(x, t, y) with guidance scale `cfg_scale`; the caller's batch stays B.

    Inside, the batch is doubled to [x; x] with labels [y; num_classes]. Output channels beyond the
    guided ones (remaining eps channels with "first3", and learned-variance channels) come from the
    conditional half. `interval=(low, high)`: guidance only where low <= t <= high (t in training
    timesteps), the plain conditional output elsewhere. cfg_scale == 1 returns `model` itself.
    """
    if channels not in CHANNEL_MODES:
        raise DiffusionError(
            f"unknown guidance channels {channels!r}; choose from {', '.join(CHANNEL_MODES)}"
        )
    if interval is not None:
        low, high = interval
        if low > high:
            raise DiffusionError(f"guidance interval ({low}, {high}) is empty: low must be <= high")
    if cfg_scale == 1:
        return model

    def guided_all(x: Tensor, t: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        B, C = x.shape[:2]
        null = torch.full_like(y, num_classes)
        out = model(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **kwargs
        )  # [2B, C or 2C, ...]
        if out.shape[1] not in (C, 2 * C):
            raise DiffusionError(
                f"guidance: model output has {out.shape[1]} channels, expected {C} or {2 * C} (input has {C})"
            )
        cond, uncond = out[:B], out[B:]
        k = min(DIT_GUIDED_CHANNELS, C) if channels == CHANNELS_FIRST3 else C
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)  # [B, C or 2C, ...]

    if interval is None:
        return guided_all

    low, high = interval

    def guided_in_interval(x: Tensor, t: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        inside = (t >= low) & (t <= high)  # [B]
        if bool(inside.all()):
            return guided_all(x, t, y, **kwargs)
        if not bool(inside.any()):
            return model(x, t, y, **kwargs)
        # mixed batch (only when callers pass different t per sample): each part on its own path
        plain = model(x[~inside], t[~inside], y[~inside], **kwargs)
        guided = guided_all(x[inside], t[inside], y[inside], **kwargs)
        out = plain.new_empty((x.shape[0], *plain.shape[1:]))
        out[~inside] = plain
        out[inside] = guided.to(plain.dtype)
        return out

    return guided_in_interval
