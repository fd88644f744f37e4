"""Timestep samplers: uniform, and the loss-second-moment importance sampler (improved DDPM)."""

import numpy as np
import pytest
import torch

from diffusion.training_timesteps import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)

T = 5


def test_uniform_sampler_has_unit_weights_and_uses_the_given_generator():
    s = UniformSampler(T)
    state = torch.random.get_rng_state()
    t1, w1 = s.sample(64, generator=torch.Generator().manual_seed(0))
    t2, _ = s.sample(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(t1, t2) and t1.dtype == torch.long and 0 <= t1.min() and t1.max() < T
    assert torch.equal(w1, torch.ones(64))


def test_second_moment_sampler_warms_up_then_weights_by_rms_loss():
    s = LossSecondMomentResampler(T)
    rng = np.random.default_rng(0)
    losses = {t: rng.uniform(0.5, 2.0, size=12) * (t + 1) for t in range(T)}
    # 10 losses for every t but the last, 9 for it: still uniform
    s.update_with_all_losses(
        [t for t in range(T) for _ in range(10)][:-1], [x for t in range(T) for x in losses[t][:10]][:-1]
    )
    assert not s.warmed_up() and np.allclose(s.probabilities(), 1 / T)
    s.update_with_all_losses([T - 1], [losses[T - 1][9]])
    assert s.warmed_up()
    # two more losses at t = 0 push out its two oldest
    s.update_with_all_losses([0, 0], losses[0][10:12])
    history = {t: losses[t][:10] for t in range(T)}
    history[0] = losses[0][2:12]

    rms = np.array([np.sqrt(np.mean(history[t] ** 2)) for t in range(T)])
    expected = rms / rms.sum() * (1 - 0.001) + 0.001 / T
    assert np.allclose(s.probabilities(), expected, rtol=1e-12)

    t, w = s.sample(1000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(w.double(), torch.from_numpy(1 / (T * expected))[t], rtol=1e-6)
    counts = np.bincount(t.numpy(), minlength=T) / 1000
    assert np.abs(counts - expected).max() < 0.06  # sampled with the importance distribution


def test_second_moment_state_round_trip():
    a = LossSecondMomentResampler(T)
    a.update_with_all_losses(list(range(T)) * 10, list(np.arange(T * 10, dtype=float)))
    b = LossSecondMomentResampler(T)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.probabilities(), b.probabilities()) and b.warmed_up()


def test_named_samplers_draw_by_their_rule():
    """By name: "uniform" draws every t equally often with weight 1; "loss-second-moment" is uniform until every
    t has its history, and takes the step count from a diffusion object too (as ADM passes it)."""
    uniform = create_named_schedule_sampler("uniform", T)
    assert np.array_equal(uniform.probabilities(), np.full(T, 1 / T))
    t, w = uniform.sample(50_000, generator=torch.Generator().manual_seed(3))
    counts = np.bincount(t.numpy(), minlength=T)
    expected = 50_000 / T
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 18.5 and torch.equal(w, torch.ones(50_000))  # chi-square, 4 dof: p = 0.001
    diffusion = type("Diffusion", (), {"num_timesteps": 7})()
    second = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert second.num_timesteps == 7 and not second.warmed_up()
    assert np.array_equal(second.probabilities(), np.full(7, 1 / 7))
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        create_named_schedule_sampler("nope", T)
