"""Flow samplers against closed forms and independent numpy recursions written from the published equations.

The test "network" is the exact velocity of Gaussian data N(MU, S^2) on the linear path x_t = (1 - t) x + t n
(t = 1 noise): v(x, t) = E[n - x0 | x_t] = -MU + (t - (1 - t) S^2) / var_t * (x - (1 - t) MU) with
var_t = (1 - t)^2 S^2 + t^2, whose probability-flow ODE maps x_1 = z to x_0 = MU + S z exactly. Each family's
network gets its own time (sit: 1 - t, velocity x - n; repa: t, velocity n - x), so a wrong conversion fails
the closed form.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.flow import (
    FLOW_SAMPLER_NAMES,
    SAMPLERS_BY_FAMILY,
    FlowSampler,
    check_sampler,
    samplers_for,
)
from diffusion.guidance import guided_model
from diffusion.samplers import SAMPLER_NAMES
from diffusion.schedules import DiffusionError

MU, S = 0.7, 0.5
NUM_CLASSES = 10
SHAPE = (6, 4, 2, 2)  # B, C, H, W


def exact_velocity(x, t: float):
    """The user-convention velocity of N(MU, S^2) data (numpy or torch, float64)."""
    var = (1 - t) ** 2 * S**2 + t**2
    return -MU + (t - (1 - t) * S**2) / var * (x - (1 - t) * MU)


class GaussianNet:
    """A network of ``family`` returning the exact velocity in its own convention; records its times.

    With labels: the conditional output adds COND_SHIFT * y, the null label (NUM_CLASSES) subtracts NULL_SHIFT,
    so that guidance moves the result.
    """

    COND_SHIFT, NULL_SHIFT = 0.05, 0.2

    def __init__(self, family: str) -> None:
        self.family, self.times, self.dtypes = family, [], []

    def user_t(self, t_net: float) -> float:
        return 1.0 - t_net if self.family == "sit" else t_net

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert torch.all(t == t[0])
        self.times.append(float(t[0]))
        self.dtypes.append(x.dtype)
        v = exact_velocity(x.double(), self.user_t(float(t[0])))
        if y is not None:
            shift = torch.where(y == NUM_CLASSES, -self.NULL_SHIFT, self.COND_SHIFT * y.double())
            v = v + shift.view(-1, 1, 1, 1)
        return -v if self.family == "sit" else v


def z_and_labels(seed: int = 0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randint(0, NUM_CLASSES, (shape[0],), generator=g)


def numpy_velocity(x64: np.ndarray, t: float) -> np.ndarray:
    """What the sampler feeds the network: the float64 state rounded to the model dtype (float32)."""
    return exact_velocity(x64.astype(np.float32).astype(np.float64), t)


# ------------------------------------------------------------------------------------- euler, heun


def ref_euler_heun(z: np.ndarray, steps: int, heun: bool) -> np.ndarray:
    """REPA's euler_sampler from its equations: t_i = 1 - i/N; x += (t_{i+1} - t_i) v, trapezoid but the last."""
    x = z.astype(np.float64)
    for i in range(steps):
        t, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
        d = numpy_velocity(x, t)
        x_next = x + (t_next - t) * d
        if heun and i < steps - 1:
            x_next = x + (t_next - t) * (d + numpy_velocity(x_next, t_next)) / 2
        x = x_next
    return x


@pytest.mark.parametrize("family", ["sit", "repa"])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_euler_heun_equal_the_written_recursion_and_call_times(family, name):
    z, _ = z_and_labels()
    net = GaussianNet(family)
    steps = 7
    sampler = FlowSampler(name, steps, family=family)
    out = sampler(net, z)
    ref = ref_euler_heun(z.numpy(), steps, heun=name == "heun")
    np.testing.assert_allclose(out.double().numpy(), ref.astype(np.float32), rtol=0, atol=1e-6)
    user = [1 - i / steps for i in range(steps)]
    expected = user if name == "euler" else [user[0]] + [u for u in user[1:] for _ in (0, 1)]
    np.testing.assert_allclose([net.user_t(t) for t in net.times], expected, atol=1e-7)
    assert sampler.nfe == len(net.times) == (steps if name == "euler" else 2 * steps - 1)
    assert set(net.dtypes) == {torch.float32} and out.dtype == torch.float32


@pytest.mark.parametrize("family", ["sit", "repa"])
def test_network_times_are_the_familys_own(family):
    """SiT's networks are called at 1 - t (0 = noise), REPA's at t: the first Euler call is at noise."""
    net = GaussianNet(family)
    FlowSampler("euler", 4, family=family)(net, z_and_labels()[0])
    expected = [0.0, 0.25, 0.5, 0.75] if family == "sit" else [1.0, 0.75, 0.5, 0.25]
    assert net.times == pytest.approx(expected, abs=1e-7)


def closed_form_errors(name: str, steps: int, seed: int = 1) -> dict[str, float]:
    """max |x_0 - (MU + S z)| per family."""
    z, _ = z_and_labels(seed)
    exact = MU + S * z.double()
    return {family: float((FlowSampler(name, steps, family=family)(GaussianNet(family), z).double() - exact)
                          .abs().max()) for family in ("sit", "repa")}


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2)])
def test_euler_and_heun_converge_to_the_closed_form_at_their_order(name, order):
    """x_0 = MU + S z; doubling the steps divides the error by about 2^order (measured 1.97 and 4.19 here)."""
    coarse, fine = closed_form_errors(name, 20), closed_form_errors(name, 40)
    assert fine["sit"] == pytest.approx(fine["repa"], rel=1e-4, abs=1e-6)
    assert 0.8 * 2**order < coarse["sit"] / fine["sit"] < 1.25 * 2**order
    assert fine["sit"] < (0.1 if order == 1 else 0.003)


@pytest.mark.parametrize("name", ["dpm++2m", "unipc"])
def test_multistep_solvers_beat_euler_at_the_same_calls(name):
    """diffusers' solvers on flow sigmas: several times closer to the closed form than Euler at 40 calls
    (measured: dpm++2m 0.010, unipc 0.0034, euler 0.061), the same for both families."""
    errors, euler = closed_form_errors(name, 40), closed_form_errors("euler", 40)
    assert errors["sit"] == pytest.approx(errors["repa"], rel=1e-3, abs=1e-6)
    assert errors["sit"] < euler["sit"] / 4


# ------------------------------------------------------------------------------------- euler-maruyama


class RecordingNoise:
    """A noise_fn that draws from a private generator and keeps every draw."""

    def __init__(self, seed: int) -> None:
        self.gen, self.draws = torch.Generator().manual_seed(seed), []

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        d = torch.randn(like.shape, generator=self.gen, dtype=torch.float32)
        self.draws.append(d)
        return d


def ref_euler_maruyama(z: np.ndarray, draws: list[np.ndarray], steps: int) -> np.ndarray:
    """The reverse SDE of the linear path with diffusion g^2 = 2 t (SiT's w = sigma), written out:

    score = -E[n | x] / t with E[n | x] = x + (1 - t) v, drift = v - (g^2 / 2) score = x + (2 - t) v;
    t = linspace(1, 0.04, N) then 0, noise sqrt(2 t |dt|) n_i on the first N - 1 steps only.
    """
    ts = [1.0 + (0.04 - 1.0) * i / (steps - 1) for i in range(steps)] + [0.0]
    x = z.astype(np.float64)
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        v = numpy_velocity(x, t)
        x = x + (x + (2.0 - t) * v) * dt
        if i < steps - 1:
            x = x + np.sqrt(2.0 * t * abs(dt)) * draws[i].astype(np.float64)
    return x


@pytest.mark.parametrize("family", ["sit", "repa"])
def test_euler_maruyama_equals_the_written_recursion_with_one_float32_draw_per_stochastic_step(family):
    z, _ = z_and_labels(2)
    steps = 9
    noise = RecordingNoise(5)
    net = GaussianNet(family)
    out = FlowSampler("euler-maruyama", steps, family=family)(net, z, noise=noise)
    assert len(noise.draws) == steps - 1
    assert all(d.dtype == torch.float32 and d.shape == z.shape for d in noise.draws)
    ref = ref_euler_maruyama(z.numpy(), [d.numpy() for d in noise.draws], steps)
    np.testing.assert_allclose(out.double().numpy(), ref.astype(np.float32), rtol=0, atol=2e-6)
    expected_t = [1.0 + (0.04 - 1.0) * i / (steps - 1) for i in range(steps)]
    np.testing.assert_allclose([net.user_t(t) for t in net.times], expected_t, atol=1e-7)


def test_euler_maruyama_samples_the_data_distribution():
    """4,000 scalar samples of N(MU, S^2) through 100 SDE steps: mean and spread within sampling error."""
    z = torch.randn((4000, 1, 1, 1), generator=torch.Generator().manual_seed(3))
    out = FlowSampler("euler-maruyama", 100, family="sit")(GaussianNet("sit"), z, noise=RecordingNoise(4))
    mean, std = float(out.double().mean()), float(out.double().std())
    assert abs(mean - MU) < 4 * S / np.sqrt(4000)
    assert abs(std / S - 1) < 0.05
    # the deterministic map would give exactly MU + S z: the SDE's samples are new draws, not that map
    assert float((out.double() - (MU + S * z.double())).abs().mean()) > 0.1


def test_euler_maruyama_draws_from_a_sample_noise_stream():
    from diffusion.rng import SampleNoise

    z, _ = z_and_labels(6)
    seeds = list(range(z.shape[0]))
    a = FlowSampler("euler-maruyama", 5, family="repa")(GaussianNet("repa"), z, noise=SampleNoise(seeds))
    # the same stream layout by hand: per sample, 4 draws of its own generator in order
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draws = [torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens]) for _ in range(4)]
    it = iter(draws)
    b = FlowSampler("euler-maruyama", 5, family="repa")(GaussianNet("repa"), z, noise=lambda like: next(it))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- guidance


def ref_guided_euler(z: np.ndarray, y: np.ndarray, steps: int, scale: float, interval, channels: str, heun: bool):
    """REPA's guided euler/heun: guidance where low <= t_cur <= high (user t), both evaluations of a step alike."""
    cond_shift = (GaussianNet.COND_SHIFT * y).reshape(-1, 1, 1, 1)
    k = 3 if channels == "first3" else z.shape[1]

    def vel(x, t, guide):
        c = numpy_velocity(x, t) + cond_shift
        if not guide:
            return c
        u = numpy_velocity(x, t) - GaussianNet.NULL_SHIFT
        out = c.copy()
        out[:, :k] = u[:, :k] + scale * (c[:, :k] - u[:, :k])
        return out

    x = z.astype(np.float64)
    for i in range(steps):
        t, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
        guide = interval[0] <= t <= interval[1]
        d = vel(x, t, guide)
        x_next = x + (t_next - t) * d
        if heun and i < steps - 1:
            x_next = x + (t_next - t) * (d + vel(x_next, t_next, guide)) / 2
        x = x_next
    return x


@pytest.mark.parametrize("family", ["sit", "repa"])
@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("channels", ["first3", "all"])
def test_guidance_interval_is_in_the_users_time(family, name, channels):
    """Guided only at t <= 0.45 (1 = noise): for a SiT network that is network time >= 0.55."""
    z, y = z_and_labels(7)
    steps, scale, interval = 10, 2.5, (0.0, 0.45)
    fn = guided_model(GaussianNet(family), scale, NUM_CLASSES, channels, interval=interval)
    out = FlowSampler(name, steps, family=family)(fn, z, model_kwargs={"y": y})
    ref = ref_guided_euler(z.numpy(), y.numpy(), steps, scale, interval, channels, heun=name == "heun")
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=2e-6)
    wrong = ref_guided_euler(z.numpy(), y.numpy(), steps, scale, (0.55, 1.0), channels, heun=name == "heun")
    assert np.abs(out.double().numpy() - wrong).max() > 1e-2  # the other reading of the interval differs


# ------------------------------------------------------------------------------------- dpm++2m, unipc, dopri5


def ref_dpmpp_2m(z: np.ndarray, steps: int, train_steps: int = 1000) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on the flow path alpha = 1 - sigma, data prediction
    x0 = x - sigma v; diffusers' flow sigmas (1 - 1/T) (1 - i/N) then 0, the last step first order."""
    sig = [(1 - 1 / train_steps) * (1 - i / steps) for i in range(steps)] + [0.0]
    x, prev_x0, prev_h = z.astype(np.float64), None, None
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        x0 = x - s * numpy_velocity(x, s)
        if s_next == 0:
            x = x0
            break
        lam, lam_next = np.log((1 - s) / s), np.log((1 - s_next) / s_next)
        h = lam_next - lam
        d = x0 if prev_x0 is None else x0 + (x0 - prev_x0) * h / (2 * prev_h)  # D = (1 + 1/2r) x0 - x0_prev/2r
        x = (s_next / s) * x - (1 - s_next) * np.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


def test_dpmpp_2m_equals_the_written_solver():
    z, _ = z_and_labels(8)
    for steps in (1, 2, 12):
        out = FlowSampler("dpm++2m", steps, family="sit")(GaussianNet("sit"), z)
        np.testing.assert_allclose(out.double().numpy(), ref_dpmpp_2m(z.numpy(), steps), rtol=0, atol=2e-5)


def test_dopri5_solves_the_ode_and_reports_its_calls():
    pytest.importorskip("torchdiffeq")
    z, _ = z_and_labels(9)
    exact = MU + S * z.double()
    sampler = FlowSampler("dopri5", 2, family="sit")
    out = sampler(GaussianNet("sit"), z)
    assert float((out.double() - exact).abs().max()) < 1e-2  # atol 1e-6, rtol 1e-3 in float32
    assert sampler.nfe == sampler.last_nfe and sampler.nfe >= 7
    tight = FlowSampler("dopri5", 2, family="repa", atol=1e-9, rtol=1e-9)
    out = tight(GaussianNet("repa"), z.double())
    assert float((out - exact).abs().max()) < 1e-6
    assert "batch" in tight.describe()["solver"]["batch_dependent"]


def test_dopri5_without_torchdiffeq_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # what an environment without the package gives
    msg = one_line(FlowSampler("dopri5", 2), GaussianNet("sit"), z_and_labels()[0])
    assert "torchdiffeq" in msg


# ------------------------------------------------------------------------------------- settings and errors


def one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(DiffusionError) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_minimum_steps_and_names_are_one_line_errors():
    for name in FLOW_SAMPLER_NAMES:
        least = 2 if name in ("euler-maruyama", "dopri5") else 1
        FlowSampler(name, least)
        msg = one_line(FlowSampler, name, least - 1)
        assert f"at least {least}" in msg and name in msg
    assert "euler-maruyama" in one_line(FlowSampler, "ddpm", 10)
    assert "sit, repa" in one_line(FlowSampler, "euler", 10, family="dit")


def test_family_registry():
    assert samplers_for("dit") == SAMPLER_NAMES
    assert samplers_for("sit") == samplers_for("repa") == FLOW_SAMPLER_NAMES
    check_sampler("ddpm", "dit")
    check_sampler("euler-maruyama", "repa")
    msg = one_line(check_sampler, "ddpm", "sit")
    assert all(name in msg for name in FLOW_SAMPLER_NAMES) and "flow" in msg
    assert "ddim" in one_line(check_sampler, "dopri5", "dit")
    assert "dit, sit, repa" in one_line(samplers_for, "edm")
    assert set(SAMPLERS_BY_FAMILY) == {"dit", "sit", "repa"}


def test_a_learned_sigma_output_is_refused():
    def doubled(x, t, **kwargs):
        return torch.cat([x, x], dim=1)

    assert "first half" in one_line(FlowSampler("euler", 2), doubled, z_and_labels()[0])


@pytest.mark.parametrize("name", ["dpm++2m", "unipc"])
def test_a_scheduler_sampler_starts_afresh_at_every_call(name):
    z, _ = z_and_labels(10)
    sampler = FlowSampler(name, 6, family="repa")
    first = sampler(GaussianNet("repa"), z)
    sampler(GaussianNet("repa"), z * 2)  # another batch in between
    assert torch.equal(sampler(GaussianNet("repa"), z), first)


def test_describe_records_steps_nfe_and_conventions():
    d = FlowSampler("heun", 5, family="sit").describe()
    assert d["nfe"] == 9 and d["steps"] == 5 and d["family"] == "sit" and "t=1 noise" in d["time_convention"]
    assert "1 - t" in d["network_time"] and len(d["times"]) == 9 and d["state_dtype"] == "float64"
    d = FlowSampler("unipc", 10, family="repa").describe()
    assert d["scheduler"]["class"] == "UniPCMultistepScheduler" and d["scheduler"]["use_flow_sigmas"]
    assert len(d["times"]) == d["nfe"] == 10
    d = FlowSampler("euler-maruyama", 250).describe()
    assert d["sde"]["stochastic_steps"] == 249 and d["times"][-1] == pytest.approx(0.04)
