"""diffusers-based samplers against plain loops over the library's own schedulers; DDIM against DDIMScheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffusion import DiffusionError, guided_model
from diffusion.rng import SampleNoise
from diffusion.samplers import SAMPLER_NAMES, Sampler

T = 1000
NUM_CLASSES, C, H = 10, 3, 4
SEEDS = [21, 22, 23, 24]
LABELS = torch.tensor([1, 4, 7, 9])

# independent set-up of each scheduler (the sampler builds its own through diffusion.samplers)
PLAIN = {  # step placement: log-SNR uniform for the multistep solvers, Karras (EDM) for Heun, default for Euler
    "dpm++2m": lambda **kw: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                        use_lu_lambdas=True, **kw),
    "dpm++2m-sde": lambda **kw: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2,
                                                            use_lu_lambdas=True, **kw),
    "unipc": lambda **kw: UniPCMultistepScheduler(use_exponential_sigmas=True, **kw),
    "euler": lambda **kw: EulerDiscreteScheduler(**kw),
    "heun": lambda **kw: HeunDiscreteScheduler(use_karras_sigmas=True, **kw),
}


def _betas(schedule: str) -> np.ndarray:
    """Linear 1e-4..0.02 or cosine (improved DDPM eq. 17, betas capped at 0.999), written out here."""
    if schedule == "linear":
        return np.linspace(1e-4, 0.02, T)
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    return np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)])


class _TinyModel:
    """A smooth class-conditional function of (x, t, y) standing in for a network: [B, 2C, H, W], counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        tt = t.float().view(-1, 1, 1, 1) / T
        yy = y.float().view(-1, 1, 1, 1) / NUM_CLASSES
        out = torch.tanh(0.8 * x + 0.5 * torch.sin(3 * tt + yy) + 0.1 * torch.arange(C).view(1, -1, 1, 1))
        return torch.cat([out, -out], dim=1)


def _start(seeds=SEEDS):
    noise = SampleNoise(seeds)
    return noise.randn((C, H, H)), noise


def _plain_loop(name, schedule, prediction, model_fn, steps, x_T, generators, sigma_now=None):
    """diffusers' documented loop; `sigma_now` (a dict), if given, holds each call's noise level under "sigma"."""
    scheduler = PLAIN[name](num_train_timesteps=T, trained_betas=_betas(schedule).tolist(), prediction_type=prediction)
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if sigma_now is not None:
            sigma_now["sigma"] = float(scheduler.sigmas[i])
        out = model_fn(x_in, t.expand(len(x)), LABELS)
        extra = {} if generators is None else {"generator": generators}
        x = scheduler.step(out[:, :C], t, x, **extra).prev_sample
    return x


@pytest.mark.parametrize("name,schedule,prediction", [
    ("dpm++2m", "linear", "epsilon"), ("dpm++2m-sde", "linear", "epsilon"), ("unipc", "linear", "epsilon"),
    ("euler", "linear", "epsilon"), ("heun", "linear", "epsilon"),
    ("dpm++2m", "cosine", "v_prediction"), ("euler", "cosine", "v_prediction"),
])
def test_sampler_equals_a_plain_loop_over_the_diffusers_scheduler(name, schedule, prediction):
    steps = 6
    model_fn = guided_model(_TinyModel(), 2.0, NUM_CLASSES, "first3", interval=(100, 700))
    x_T, noise = _start()
    sampler = Sampler(name, steps, noise_schedule=schedule, predict_v=prediction == "v_prediction")
    ours = sampler(model_fn, x_T, noise=noise, model_kwargs={"y": LABELS})

    generators = None
    if name == "dpm++2m-sde":  # the stochastic one: one CPU generator per sample, as diffusers documents
        generators = [torch.Generator().manual_seed(s) for s in SEEDS]
        for g in generators:
            torch.randn((C, H, H), generator=g)  # x_T came first from each stream
    expected = _plain_loop(name, schedule, prediction, model_fn, steps, x_T, generators)
    err = (ours - expected).abs().max().item()
    print(f"\n{name} {schedule} {prediction}: max |ours - plain diffusers loop| = {err:.1e}")
    assert err <= 1e-5


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddim_eta0_agrees_with_diffusers_ddim_scheduler(steps, dtype):
    model = _TinyModel()
    x_T = _start()[0].to(dtype)
    ours = Sampler("ddim", steps)(model, x_T, model_kwargs={"y": LABELS})
    # ddimN keeps 0, s, 2s, ... with s = T / N: diffusers' "leading" spacing with no offset; the last step goes
    # to abar = 1 (ADM's abar_{-1}), i.e. set_alpha_to_one=True
    scheduler = DDIMScheduler(num_train_timesteps=T, trained_betas=_betas("linear").tolist(), clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == [ts.model_t for ts in Sampler("ddim", steps).timesteps]
    if dtype == torch.float64:  # diffusers keeps abar in float32; give it the float64 products for this check
        scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1 - _betas("linear")))
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(len(x)), LABELS)[:, :C], t, x, eta=0.0).prev_sample
    assert ours.dtype == x.dtype == dtype
    rel = ((ours - x).abs().max() / x.abs().max()).item()
    print(f"\nDDIM-{steps} {dtype}: max |ours - diffusers DDIMScheduler| / max |x| = {rel:.1e}")
    # float32: both are float32 arithmetic (ADM re-derives eps from x_0, diffusers does not): a few ulps of |x|
    assert rel <= (1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_samples_do_not_depend_on_the_batch(name):
    sampler = Sampler(name, 6)
    model_fn = guided_model(_TinyModel(), 1.5, NUM_CLASSES, "all")
    x_T, noise = _start()
    together = sampler(model_fn, x_T, noise=noise, model_kwargs={"y": LABELS}, clip_denoised=True)
    parts = []
    for part in (slice(0, 2), slice(2, 4)):
        x_T, noise = _start(SEEDS[part])
        parts.append(sampler(model_fn, x_T, noise=noise, model_kwargs={"y": LABELS[part]}, clip_denoised=True))
    assert torch.allclose(together, torch.cat(parts), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,steps,nfe", [("ddpm", 7, 7), ("ddim", 10, 10), ("dpm++2m", 7, 7),
                                            ("dpm++2m-sde", 7, 7), ("unipc", 7, 7), ("euler", 7, 7),
                                            ("heun", 7, 13)])
def test_nfe_counts_model_calls(name, steps, nfe):
    model = _TinyModel()
    sampler = Sampler(name, steps)
    x_T, noise = _start()
    sampler(model, x_T, noise=noise, model_kwargs={"y": LABELS})
    assert model.calls == sampler.nfe == nfe
    assert sampler.describe()["nfe"] == nfe


@pytest.mark.parametrize("name,prediction", [("dpm++2m", "epsilon"), ("euler", "epsilon"), ("heun", "v_prediction")])
def test_clip_denoised_keeps_the_implied_x0_in_range(name, prediction):
    """Against the plain loop with a model whose x_0 is clipped and its eps (or v) re-derived, ADM's way."""
    predict_v = prediction == "v_prediction"
    now = {}

    def loud(x, t, y):  # x_0 far outside [-1, 1]
        return 4 * _TinyModel()(x, t, y)

    def clipped(x, t, y):
        a = 1 / (1 + now["sigma"] ** 2)  # alpha_bar of the step's noise level (t is rounded for dpm++2m)
        out = loud(x, t, y)[:, :C].double()
        x = x.double()
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * out if predict_v else (x - math.sqrt(1 - a) * out) / math.sqrt(a)
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        new = math.sqrt(a) * eps - math.sqrt(1 - a) * x0 if predict_v else eps
        return torch.cat([new.float(), new.float()], dim=1)

    x_T, _ = _start()
    ours = Sampler(name, 6, predict_v=predict_v)(loud, x_T, model_kwargs={"y": LABELS}, clip_denoised=True)
    expected = _plain_loop(name, "linear", prediction, clipped, 6, x_T, None, now)
    unclipped = Sampler(name, 6, predict_v=predict_v)(loud, x_T, model_kwargs={"y": LABELS})
    assert (ours - expected).abs().max() <= 1e-4 and (unclipped - expected).abs().max() > 1e-2


def test_bad_sampler_settings_are_one_line_errors():
    with pytest.raises(DiffusionError, match="unknown sampler"):
        Sampler("plms", 10)
    with pytest.raises(DiffusionError, match="eta"):
        Sampler("euler", 10, eta=0.5)
    with pytest.raises(DiffusionError, match="unipc needs at least 1 step"):
        Sampler("unipc", 0)
    with pytest.raises(DiffusionError, match="at most the 1000 training steps"):
        Sampler("unipc", T + 1)
    for name, low in (("ddpm", 2), ("ddim", 2), ("euler", 2), ("heun", 6)):
        with pytest.raises(DiffusionError, match=f"{name} needs at least {low} steps"):
            Sampler(name, low - 1)
        Sampler(name, low)
    for name in ("dpm++2m", "unipc", "euler", "heun"):  # every step count up to T works
        Sampler(name, T)


def test_a_multistep_spacing_that_repeats_a_noise_level_is_refused(monkeypatch):
    """diffusers' default (linspace) placement repeats a timestep at 1000 of 1000 steps: h = 0, NaN."""
    import diffusion.samplers as samplers

    monkeypatch.setitem(samplers.SCHEDULERS, "dpm++2m", ("DPMSolverMultistepScheduler", {"solver_order": 2}))
    with pytest.raises(DiffusionError, match="at most 999 steps"):
        Sampler("dpm++2m", T)
    Sampler("dpm++2m", T - 1)
    with pytest.raises(DiffusionError, match="noise source"):
        Sampler("dpm++2m-sde", 5)(_TinyModel(), torch.zeros(1, C, H, H), model_kwargs={"y": LABELS[:1]})


@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_adm_samplers_are_the_official_loops_bit_for_bit(name, eta):
    model_fn = guided_model(_TinyModel(), 1.5, NUM_CLASSES, "first3", interval=(200, 800))
    x_T, noise = _start()
    ours = Sampler(name, 8, eta=eta)(model_fn, x_T, noise=noise, model_kwargs={"y": LABELS}, clip_denoised=True)
    x_T, noise = _start()
    d = Sampler(name, 8, eta=eta).diffusion
    kwargs = dict(noise=x_T, clip_denoised=True, model_kwargs={"y": LABELS}, noise_fn=noise)
    official = (d.p_sample_loop(model_fn, x_T.shape, **kwargs) if name == "ddpm"
                else d.ddim_sample_loop(model_fn, x_T.shape, eta=eta, **kwargs))
    assert torch.equal(ours, official)
