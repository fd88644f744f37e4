"""Respacing: kept timesteps, respaced betas, and ADM faithfulness at every kept step."""

import numpy as np
import pytest
import torch

from diffusion import DiffusionError, create_diffusion, space_timesteps

T = 1000
FAITHFUL_RTOL = 1e-6


def test_250_keeps_adm_sections(ref):
    kept = space_timesteps(T, "250")
    # one section of 1000 steps: round(j * 999 / 249), j = 0..249
    assert kept == [round(j * 999 / 249) for j in range(250)]
    assert kept == ref.adm_section_steps(T, [250])
    assert kept[:4] == [0, 4, 8, 12] and kept[-1] == 999


def test_section_list_keeps_adm_sections(ref):
    kept = space_timesteps(T, "10,20,30")
    # sections of 334, 333, 333 steps (the remainder goes to the first)
    assert kept == ref.adm_section_steps(T, [10, 20, 30])
    assert len(kept) == 60
    assert kept[0] == 0 and kept[9] == 333 and kept[10] == 334 and kept[29] == 666 and kept[-1] == 999
    assert space_timesteps(T, [10, 20, 30]) == kept
    assert space_timesteps(T, 250) == space_timesteps(T, [250]) == space_timesteps(T, "250")


def test_ddim_keeps_a_constant_stride():
    assert space_timesteps(T, "ddim25") == list(range(0, T, 40))
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert space_timesteps(T, "ddim1000") == list(range(T))


@pytest.mark.parametrize("spec", ["ddim600", "ddim999", "1001", "abc", "ddimx", "10,,2", "0"])
def test_impossible_respacing_is_one_line_error(spec):
    with pytest.raises(DiffusionError) as info:
        space_timesteps(T, spec)
    assert "\n" not in str(info.value)


def test_full_respacing_keeps_everything():
    for spec in (None, ""):
        d = create_diffusion(spec)
        assert d.num_timesteps == T and d.timestep_map == list(range(T))


@pytest.mark.parametrize("spec", ["250", "ddim25", "10,20,30"])
def test_respaced_betas_are_alpha_bar_ratios(spec, ref):
    d = create_diffusion(spec)
    kept = space_timesteps(T, spec)
    abar = ref.linear_alpha_bar(T)[kept]
    expected = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    assert d.timestep_map == kept
    assert ref.rel_err(d.betas, expected) < 1e-9
    assert ref.rel_err(d.alphas_cumprod, abar) < 1e-12


def _recording_model(C, calls, var_values):
    def model(x, t, y=None):
        calls.append(t.clone())
        # an eps prediction that keeps x_0 = x_t / 2 inside [-1, 1]; the variance channels are given
        return torch.cat([x * 0.1, var_values.to(x.dtype)], dim=1)

    return model


@pytest.mark.parametrize("spec", ["250", "ddim25"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_kept_step_matches_adm_formulas(spec, dtype, ref):
    """Posterior mean/variance and learned-range log variance at every kept step vs numpy float64."""
    d = create_diffusion(spec)  # learn_sigma=True -> LEARNED_RANGE
    kept = space_timesteps(T, spec)
    K = len(kept)
    r = ref.respaced(ref.linear_alpha_bar(T), kept)
    gen = torch.Generator().manual_seed(0)
    C = 2
    shape = (K, C, 3, 3)
    x0 = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1  # positive: plain relative errors
    xt = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1
    t = torch.arange(K)

    def bcast(a):
        return a.reshape(K, 1, 1, 1)

    # q(x_{t-1} | x_t, x_0)
    mean, var, log_var = d.q_posterior_mean_variance(x0.to(dtype), xt.to(dtype), t)
    x0n, xtn = x0.numpy(), xt.numpy()
    exp_mean = bcast(r["coef_x0"]) * x0n + bcast(r["coef_xt"]) * xtn
    errs = {
        "posterior_mean": ref.rel_err(mean, exp_mean),
        "posterior_variance": ref.rel_err(var, np.broadcast_to(bcast(r["post_var"]), shape)),
        "posterior_log_variance": ref.rel_err(log_var, np.broadcast_to(bcast(r["post_log_var"]), shape)),
    }
    assert var[0].abs().max() == 0  # beta~_0 = 0 exactly

    # learned range: log var = frac log beta_t + (1 - frac) log beta~_t (clipped), frac = (v + 1) / 2
    v = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    calls = []
    out = d.p_mean_variance(_recording_model(C, calls, v), xt.to(dtype), t, clip_denoised=True)
    assert torch.equal(calls[0], torch.tensor(kept))  # the model sees original timesteps
    frac = (v.numpy() + 1) / 2
    exp_log_var = frac * bcast(np.log(r["beta"])) + (1 - frac) * bcast(r["post_log_var"])
    errs["learned_log_variance"] = ref.rel_err(out["log_variance"], exp_log_var)
    errs["learned_variance"] = ref.rel_err(out["variance"], np.exp(exp_log_var))
    # model mean from the eps prediction: x_0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps, clipped to [-1, 1]
    eps = 0.1 * xtn
    pred_x0 = np.clip(xtn / np.sqrt(bcast(r["abar"])) - np.sqrt(1 / bcast(r["abar"]) - 1) * eps, -1, 1)
    terms = (bcast(r["coef_x0"]) * pred_x0, bcast(r["coef_xt"]) * xtn)
    errs["model_mean"] = ref.rel_err(
        out["mean"], terms[0] + terms[1], scale=np.abs(terms[0]) + np.abs(terms[1])
    )

    print(f"\n{spec} {dtype}: " + ", ".join(f"{k}={e:.2e}" for k, e in errs.items()))
    if dtype == torch.float64:
        assert max(errs.values()) < 1e-12, errs
    else:
        # float32 arithmetic, as ADM: exp() of a float32 log variance (|log| ~ 9, ulp ~ 1e-6) is only
        # good to ~2 ulps of the log, so the variance itself gets 2x the budget; everything else 1e-6.
        variance_err = errs.pop("learned_variance")
        assert variance_err < 2 * FAITHFUL_RTOL
        assert max(errs.values()) < FAITHFUL_RTOL, errs
