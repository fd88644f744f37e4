"""The one sampling-loop driver: a sampler is a step function run over a list of timesteps known up front.

In the style of k-diffusion's sampling.py: a sampler is a function of (model_fn, x_T, timesteps, random
streams); no global RNG, no files. The driver owns what every sampler shares: the per-step model call
(model_kwargs bound, the timestep tensor built from a host-side number, never copied from the host),
the fresh normal draws (counted before the loop, so a noise source can produce them ahead of use), and
the per-step choice of model function (`for_timestep`, used by the guidance interval) made on the host,
so a step never waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion.schedules import DiffusionError

ModelFn = Callable[..., Any]
NoiseFn = Callable[[Tensor], Tensor]


class Timestep(NamedTuple):
    """One step of a sampling loop, known on the host before the loop starts."""

    index: int  # the step function's own index (ADM: respaced step k; a scheduler: position in its list)
    model_t: int | float  # the timestep the model sees, in training units 0..T-1 (int -> long, float -> float32)
    noisy: bool  # whether the step consumes one fresh standard normal draw shaped like x


Denoise = Callable[[Tensor], Tensor]  # model input [B, C, ...] -> model output at this step's timestep
# step(denoise, x, timestep, noise or None) -> (x_next, predicted x_0 or None)
StepFn = Callable[[Denoise, Tensor, Timestep, "Tensor | None"], tuple[Tensor, "Tensor | None"]]


class NoiseStream(Protocol):
    """Draws produced ahead of use; the driver closes it when the loop ends (also on an error)."""

    def __next__(self) -> Tensor: ...

    def close(self) -> None: ...


def model_for_timestep(model_fn: ModelFn, t: float) -> ModelFn:
    """The function to call at training timestep t: model_fn.for_timestep(t) if it has one, else model_fn.

    A model function whose behaviour depends on the step (the guidance interval) offers for_timestep(t) so
    that the choice is made on the host, once per step, instead of by reading t back from the device.
    """
    pick = getattr(model_fn, "for_timestep", None)
    return pick(t) if callable(pick) else model_fn


class _CallEach:
    """A NoiseStream over a plain noise_fn(like): one call per draw, checked."""

    def __init__(self, noise_fn: NoiseFn, like: Tensor) -> None:
        self.noise_fn, self.like = noise_fn, like

    def __next__(self) -> Tensor:
        noise = self.noise_fn(self.like)
        if tuple(noise.shape) != tuple(self.like.shape):
            raise DiffusionError(f"noise_fn returned shape {tuple(noise.shape)}, expected {tuple(self.like.shape)}")
        return noise.to(device=self.like.device, dtype=self.like.dtype)

    def close(self) -> None:
        """Nothing to release."""


def open_noise(noise: Any, like: Tensor, count: int) -> NoiseStream | None:
    """`count` fresh draws shaped like `like`: noise.stream(like, count) when the source has it (drawn ahead,
    e.g. SampleNoise), else one noise(like) call per draw. None when no draw is needed."""
    if count == 0:
        return None
    if noise is None:
        raise DiffusionError(
            f"this sampler needs fresh noise at {count} steps but no noise source was given "
            "(pass noise=SampleNoise(...))"
        )
    stream = getattr(noise, "stream", None)
    return stream(like, count) if callable(stream) else _CallEach(noise, like)


def _model_timestep(value: int | float, batch: int, device: torch.device) -> Tensor:
    """t [B] on the device, filled from a host number (a fill kernel, no host-to-device copy)."""
    dtype = torch.long if isinstance(value, int) else torch.float32
    return torch.full((batch,), value, device=device, dtype=dtype)


def sample_loop(
    step: StepFn,
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Sequence[Timestep],
    *,
    noise: Any = None,
    model_kwargs: dict | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> Tensor:
    """Run `step` over `timesteps` from x (x_T, already scaled as the sampler wants) and return the result.

    model_fn(x, t, **model_kwargs) -> output; t [B] holds the step's model_t. noise: a noise_fn(like) or an
    object with stream(like, count) (SampleNoise); needed only when some step is noisy. callback gets
    dict(i, timestep, sample, pred_xstart) after every step.
    """
    model_kwargs = model_kwargs or {}
    draws = open_noise(noise, x, sum(1 for ts in timesteps if ts.noisy))
    try:
        with torch.no_grad():
            for i, ts in enumerate(tqdm(timesteps, disable=not progress)):
                fn = model_for_timestep(model_fn, ts.model_t)
                t = _model_timestep(ts.model_t, x.shape[0], x.device)

                def denoise(x_in: Tensor, fn: ModelFn = fn, t: Tensor = t) -> Tensor:
                    return fn(x_in, t, **model_kwargs)

                z = next(draws) if ts.noisy else None  # type: ignore[arg-type]
                x, pred_xstart = step(denoise, x, ts, z)
                if callback is not None:
                    callback({"i": i, "timestep": ts, "sample": x, "pred_xstart": pred_xstart})
    finally:
        if draws is not None:
            draws.close()
    return x

