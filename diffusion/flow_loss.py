"""The flow-matching training objective of SiT and REPA: a linear interpolant and its velocity as the target.

In the user's convention (REPA's, that of ``diffusion.flow``): t ~ U[0, 1], t = 1 is noise,

    x_t = (1 - t) x + t noise,    v = dx_t/dt = noise - x,    loss = mean over pixels of (v_theta - v)^2.

The network is trained in its family's own convention, so that the samplers' conversion is the inverse of
this one: ``sit`` (SiT's, and this project's flow models) sees t_net = 1 - t and learns x - noise (SiT's
x_t = t_net x + (1 - t_net) noise and u_t = x - noise); ``repa`` sees t and learns noise - x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusion.flow import FAMILY_SIT, FLOW_FAMILIES, network_time, velocity_from_network
from diffusion.schedules import DiffusionError


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t noise for t [B] (1 = noise) and x, noise [B, C, ...]."""
    t = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (1 - t) * x + t * noise


def flow_matching_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    t: Tensor,
    noise: Tensor,
    family: str = FAMILY_SIT,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Per-sample velocity MSE [B] of ``model`` (a ``family`` network) at user times t [B] (1 = noise).

    Returns {"loss", "mse"} (the same [B] tensor: no weighting) and "target", the network's target.
    """
    if family not in FLOW_FAMILIES:
        raise DiffusionError(f"flow matching trains a flow family ({', '.join(FLOW_FAMILIES)}), not {family!r}")
    x_t = interpolate(x, noise, t)
    t_net = network_time(family, t)  # works on tensors: 1 - t for sit
    target = velocity_from_network(family, noise - x)  # the velocity in the network's convention
    out = model(x_t, t_net, **(model_kwargs or {}))
    if out.shape != x.shape:
        raise DiffusionError(f"flow model output has shape {tuple(out.shape)}, expected the input's {tuple(x.shape)} "
                             "(the velocity only)")
    mse = (out.float() - target.float()).pow(2).mean(dim=tuple(range(1, x.ndim)))
    return {"loss": mse, "mse": mse, "target": target}


def sample_flow_times(batch: int, device: torch.device | str) -> Tensor:
    """t ~ U[0, 1) [B] float32 from the global generator of ``device`` (seeded by the training loop)."""
    return torch.rand(batch, device=device)
