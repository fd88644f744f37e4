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

    Inside, the batch is doubled to [x; x] with labels [y; num_classes]; the combination runs in float32
    (bf16/fp16 outputs are upcast first), so the guided output is float32 or float64. Output channels beyond
    the guided ones (remaining eps channels with "first3", and learned-variance channels) come from the
    conditional half. `interval=(low, high)`: guidance only where low <= t <= high, the plain conditional
    output elsewhere; the sampling loop picks the function of each step on the host (`for_timestep(t)`), with
    t on the sampler's clock: training timesteps for the ADM and diffusers samplers (diffusion.samplers), the
    user's flow time (1 = noise, REPA's guidance_low/high, whatever the network's own convention) for the
    flow samplers (diffusion.flow), which also keep one decision for both evaluations of a Heun step.
    cfg_scale == 1 returns `model` itself.
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
        k = min(DIT_GUIDED_CHANNELS, C) if channels == CHANNELS_FIRST3 else C
        # the combination in (at least) float32: a no-op for fp32/fp64 outputs, an upcast for bf16/fp16 ones
        combine_dtype = torch.promote_types(out.dtype, torch.float32)
        cond, uncond = out[:B, :k].to(combine_dtype), out[B:, :k].to(combine_dtype)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([guided, out[:B, k:].to(combine_dtype)], dim=1)  # [B, C or 2C, ...]

    if interval is None:
        return guided_all
    return _IntervalGuided(model, guided_all, interval)


class _IntervalGuided:
    """Guidance only for low <= t <= high on the sampler's clock; the plain conditional model elsewhere.

    A sampling loop knows each step's time on the host and asks for_timestep(t) for the function of the
    whole step (no host sync). Called directly with t [B], it decides per sample on the t it is given (this
    reads t on the host): the network's t, which for a SiT network is 1 - the flow samplers' clock, so the
    flow samplers always go through for_timestep.
    """

    def __init__(self, model: ModelFn, guided: ModelFn, interval: tuple[float, float]) -> None:
        self.model, self.guided = model, guided
        self.low, self.high = interval

    def for_timestep(self, t: float) -> ModelFn:
        """The function for a step at training timestep t: guided inside the interval, plain outside."""
        return self.guided if self.low <= t <= self.high else self.model

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        inside = (t >= self.low) & (t <= self.high)  # [B]
        if bool(inside.all()):
            return self.guided(x, t, y, **kwargs)
        if not bool(inside.any()):
            return self.model(x, t, y, **kwargs)
        # mixed batch (only when callers pass different t per sample): each part on its own path
        plain = self.model(x[~inside], t[~inside], y[~inside], **kwargs)
        guided = self.guided(x[inside], t[inside], y[inside], **kwargs)
        out = guided.new_empty((x.shape[0], *guided.shape[1:]))
        out[~inside] = plain.to(guided.dtype)
        out[inside] = guided
        return out
