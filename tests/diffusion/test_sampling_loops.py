"""Sampling loops: DDIM against a straightforward numpy loop; noise only from noise_fn."""

import inspect

import numpy as np
import pytest
import torch

from diffusion import DiffusionError, create_diffusion
from diffusion.loop import Timestep, sample_loop
from diffusion.rng import SampleNoise

T = 1000


def _x0_guess(x, t_orig, tanh):
    """A denoiser in [-1, 1] that depends on x and the ORIGINAL timestep."""
    return 0.9 * tanh(1.5 * x + 0.3 * t_orig / T)


def _eps_model_numpy(x, t_orig, abar_orig):
    abar = abar_orig[t_orig]
    return (x - np.sqrt(abar) * _x0_guess(x, t_orig, np.tanh)) / np.sqrt(1 - abar)


def _make_eps_model_torch(abar_orig):
    """eps = (x_t - sqrt(abar) x0_guess) / sqrt(1 - abar), per sample, float32, with 2C output channels."""
    abar_table = torch.from_numpy(abar_orig)

    def model(x, t, y=None):
        abar = abar_table[t].to(x.dtype).view(-1, 1, 1, 1)
        t_orig = t.to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * _x0_guess(x, t_orig, torch.tanh)) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


def _numpy_ddim(x_T, kept, abar_orig, clip):
    """DDIM eta = 0 (Song et al. eq. 12) over the kept original timesteps, float64."""
    x = x_T.astype(np.float64)
    for k in reversed(range(len(kept))):
        abar = abar_orig[kept[k]]
        abar_prev = abar_orig[kept[k - 1]] if k > 0 else 1.0
        eps = _eps_model_numpy(x, kept[k], abar_orig)
        x0 = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        if clip:
            x0 = np.clip(x0, -1, 1)
            eps = (x - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
        x = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev) * eps
    return x


@pytest.mark.parametrize("spec,clip", [("ddim25", False), ("ddim25", True), ("50", False)])
def test_ddim_eta0_matches_numpy_loop(spec, clip, ref):
    d = create_diffusion(spec)
    kept = d.timestep_map
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 3, 8, 8, generator=gen)
    abar_orig = ref.linear_alpha_bar(T)
    model = _make_eps_model_torch(abar_orig)
    ours = d.ddim_sample_loop(model, tuple(noise.shape), noise=noise, clip_denoised=clip, eta=0.0)
    expected = _numpy_ddim(noise.numpy(), kept, abar_orig, clip)
    err = float(np.max(np.abs(ours.double().numpy() - expected)))
    print(f"\nDDIM {spec} clip={clip}: max abs error {err:.2e} (|x_0| max {np.abs(expected).max():.2f})")
    assert err < 1e-4


def _fixed_model(x, t, y=None):
    return torch.cat([0.5 * x, torch.tanh(x)], dim=1)  # eps and learned-range values in [-1, 1]


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_eta"])
def test_loops_are_reproducible_and_leave_global_rng_alone(loop, make_noise_fn):
    d = create_diffusion("10")
    shape = (3, 2, 4, 4)

    def run(seed):
        if loop == "p_sample_loop":
            return d.p_sample_loop(_fixed_model, shape, noise_fn=make_noise_fn(seed))
        return d.ddim_sample_loop(_fixed_model, shape, eta=1.0, noise_fn=make_noise_fn(seed))

    state = torch.random.get_rng_state()
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_ancestral_step_is_mean_plus_sigma_noise(make_noise_fn):
    d = create_diffusion("10")
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    for step in (5, 0):
        t = torch.full((2,), step)
        out = d.p_mean_variance(_fixed_model, x, t)
        z = make_noise_fn(9)(x)
        ts = Timestep(step, d.timestep_map[step], step != 0)
        seen = []

        def denoise(x_in, ts=ts, seen=seen):
            seen.append(ts.model_t)
            return _fixed_model(x_in, torch.full((2,), ts.model_t))

        sample, _ = d.ancestral_step(denoise, x, ts, z if ts.noisy else None)
        expected = out["mean"] + (step != 0) * torch.exp(0.5 * out["log_variance"]) * z
        assert torch.allclose(sample, expected, atol=1e-6)
        assert seen == [d.timestep_map[step]]


def test_sample_is_independent_of_its_batch():
    """With per-sample generators, sample i is the same alone or inside a larger batch."""
    d = create_diffusion("10")
    seeds = [11, 12, 13]
    full = d.p_sample_loop(_fixed_model, (3, 2, 4, 4), noise_fn=SampleNoise(seeds))
    alone = d.p_sample_loop(_fixed_model, (1, 2, 4, 4), noise_fn=SampleNoise(seeds[1:2]))
    assert torch.allclose(full[1:2], alone, atol=1e-6)


def test_missing_noise_source_is_a_clear_error():
    d = create_diffusion("10")
    shape = (1, 2, 4, 4)
    noise = torch.zeros(shape)
    with pytest.raises(DiffusionError, match="noise_fn"):
        d.p_sample_loop(_fixed_model, shape)  # initial x_T
    with pytest.raises(DiffusionError, match="p_sample needs fresh noise"):
        d.p_sample_loop(_fixed_model, shape, noise=noise)
    with pytest.raises(DiffusionError, match="eta > 0"):
        d.ddim_sample_loop(_fixed_model, shape, noise=noise, eta=0.5)
    # eta = 0 from given noise needs no noise source at all
    assert torch.isfinite(d.ddim_sample_loop(_fixed_model, shape, noise=noise)).all()


def test_driver_reports_every_step_and_equals_the_official_loop(make_noise_fn):
    d = create_diffusion("ddim25")
    x_T = make_noise_fn(0)(torch.empty(1, 2, 4, 4))
    steps = []
    ours = sample_loop(d.ddim_step, _fixed_model, x_T, d.sampling_timesteps(noisy=False), callback=steps.append)
    assert len(steps) == 25 and set(steps[0]) == {"i", "timestep", "sample", "pred_xstart"}
    assert [s["timestep"].model_t for s in steps] == d.timestep_map[::-1]
    assert torch.equal(ours, d.ddim_sample_loop(_fixed_model, (1, 2, 4, 4), noise=x_T))


# Parameter order and defaults of facebookresearch/DiT diffusion/gaussian_diffusion.py (commit ed81ce2).
OFFICIAL_SIGNATURES = {
    "p_sample_loop": [("model", None), ("shape", None), ("noise", None), ("clip_denoised", True),
                      ("denoised_fn", None), ("cond_fn", None), ("model_kwargs", None), ("device", None),
                      ("progress", False)],
    "ddim_sample_loop": [("model", None), ("shape", None), ("noise", None), ("clip_denoised", True),
                         ("denoised_fn", None), ("cond_fn", None), ("model_kwargs", None), ("device", None),
                         ("progress", False), ("eta", 0.0)],
    "training_losses": [("model", None), ("x_start", None), ("t", None), ("model_kwargs", None), ("noise", None)],
}


@pytest.mark.parametrize("method", sorted(OFFICIAL_SIGNATURES))
def test_official_positional_order_and_defaults(method):
    params = list(inspect.signature(getattr(create_diffusion("10"), method)).parameters.values())
    official = OFFICIAL_SIGNATURES[method]
    ours = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params[: len(official)]]
    assert ours == official
    assert all(p.default is not inspect.Parameter.empty for p in params[len(official):])  # extras are optional


def test_positional_call_binds_model_kwargs_and_rejects_cond_fn():
    d = create_diffusion("ddim5")
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def model(x, t, y):
        seen.append(y)
        return _fixed_model(x, t)

    y = torch.tensor([3, 4])
    positional = d.ddim_sample_loop(model, x_T.shape, x_T, False, None, None, {"y": y})
    assert all(torch.equal(s, y) for s in seen) and len(seen) == 5
    assert torch.equal(positional, d.ddim_sample_loop(model, x_T.shape, noise=x_T, clip_denoised=False,
                                                      model_kwargs={"y": y}))
    with pytest.raises(DiffusionError, match="cond_fn"):
        d.p_sample_loop(model, x_T.shape, x_T, True, None, lambda *a: 0, {"y": y})
