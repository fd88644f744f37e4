"""The flow-matching objective against SiT's and REPA's written equations, and an exact velocity model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.flow_loss import flow_matching_loss, interpolate, sample_flow_times
from diffusion.schedules import DiffusionError


class Recorder:
    """A network that records what it is given and returns a fixed output."""

    def __init__(self, output: torch.Tensor) -> None:
        self.output, self.seen = output, {}

    def __call__(self, x_t, t, **kwargs):
        self.seen = {"x_t": x_t, "t": t, **kwargs}
        return self.output


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.rand(5, generator=g)
    return x, noise, t


def test_sit_network_sees_sits_path_and_target():
    """SiT: x_t = t_s x + (1 - t_s) noise, u = x - noise, with t_s = 1 - t (the user's t, 1 = noise)."""
    x, noise, t = data()
    out = torch.randn_like(x)
    net = Recorder(out)
    terms = flow_matching_loss(net, x, t, noise, "sit", {"y": torch.arange(5)})
    t_s = (1 - t).numpy()[:, None, None, None]
    np.testing.assert_allclose(net.seen["t"].numpy(), 1 - t.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(net.seen["x_t"].numpy(), t_s * x.numpy() + (1 - t_s) * noise.numpy(), atol=1e-6)
    target = x.numpy() - noise.numpy()
    np.testing.assert_allclose(terms["target"].numpy(), target, atol=1e-7)
    expected = ((out.numpy() - target) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(terms["loss"].numpy(), expected, rtol=1e-6)
    assert torch.equal(net.seen["y"], torch.arange(5))


def test_repa_network_sees_repas_path_and_target():
    """REPA's SILoss (linear): x_t = (1 - t) x + t noise, target d_alpha x + d_sigma noise = noise - x."""
    x, noise, t = data(1)
    net = Recorder(torch.zeros_like(x))
    terms = flow_matching_loss(net, x, t, noise, "repa")
    tt = t.numpy()[:, None, None, None]
    np.testing.assert_allclose(net.seen["t"].numpy(), t.numpy())
    np.testing.assert_allclose(net.seen["x_t"].numpy(), (1 - tt) * x.numpy() + tt * noise.numpy(), atol=1e-6)
    np.testing.assert_allclose(terms["target"].numpy(), noise.numpy() - x.numpy(), atol=1e-7)


@pytest.mark.parametrize("family", ["sit", "repa"])
def test_the_exact_velocity_of_point_data_has_zero_loss(family):
    """Data = a fixed image a: the true velocity at x_t is known in closed form; a wrong sign or time fails."""
    a = torch.linspace(-1, 1, 48, dtype=torch.float64).view(1, 3, 4, 4).expand(5, -1, -1, -1)
    _, noise, t = data(2)
    t = t.double().clamp(0.05, 0.95)

    def exact(x_t, t_net, **kwargs):
        tb = t_net.view(-1, 1, 1, 1)
        if family == "sit":  # x_t = s a + (1 - s) n  ->  u = a - n = (a - x_t) / (1 - s)
            return (a - x_t) / (1 - tb)
        return (x_t - a) / tb  # x_t = (1 - t) a + t n  ->  v = n - a = (x_t - a) / t

    terms = flow_matching_loss(exact, a, t, noise.double(), family)
    assert float(terms["loss"].max()) < 1e-20
    wrong = flow_matching_loss(lambda x_t, t_net, **k: -exact(x_t, t_net), a, t, noise.double(), family)
    assert float(wrong["loss"].min()) > 0.1


def test_interpolate_endpoints_and_errors():
    x, noise, _ = data(3)
    assert torch.equal(interpolate(x, noise, torch.zeros(5)), x)
    assert torch.equal(interpolate(x, noise, torch.ones(5)), noise)
    with pytest.raises(DiffusionError, match="flow family"):
        flow_matching_loss(Recorder(x), x, torch.rand(5), noise, "dit")
    with pytest.raises(DiffusionError, match="the velocity only"):
        flow_matching_loss(Recorder(torch.cat([x, x], 1)), x, torch.rand(5), noise, "sit")


def test_times_are_uniform_from_the_seeded_generator():
    torch.manual_seed(4)
    t = sample_flow_times(20000, "cpu")
    torch.manual_seed(4)
    assert torch.equal(t, torch.rand(20000))
    assert t.dtype == torch.float32 and 0 <= float(t.min()) and float(t.max()) < 1
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.var()) - 1 / 12) < 0.003
