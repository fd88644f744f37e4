"""Sampling loops: DDIM against a straightforward numpy loop; noise only from noise_fn."""

import numpy as np
import pytest
import torch

from diffusion import DiffusionError, create_diffusion
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


def test_p_sample_step_is_mean_plus_sigma_noise(make_noise_fn):
    d = create_diffusion("10")
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    for step in (5, 0):
        t = torch.full((2,), step)
        out = d.p_mean_variance(_fixed_model, x, t)
        sample = d.p_sample(_fixed_model, x, t, noise_fn=make_noise_fn(9))["sample"]
        z = make_noise_fn(9)(x)
        expected = out["mean"] + (step != 0) * torch.exp(0.5 * out["log_variance"]) * z
        assert torch.allclose(sample, expected, atol=1e-6)


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


def test_progressive_loop_yields_every_step(make_noise_fn):
    d = create_diffusion("ddim25")
    steps = list(d.ddim_sample_loop_progressive(_fixed_model, (1, 2, 4, 4), noise_fn=make_noise_fn(0)))
    assert len(steps) == 25 and set(steps[0]) == {"sample", "pred_xstart"}
