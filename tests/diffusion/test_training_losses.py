"""training_losses: MSE, hybrid (stop-gradient on the mean), KL, v target, weighting, noise tweaks."""

import math

import numpy as np
import pytest
import torch

from diffusion import DiffusionError, LossType, LossWeighting, ModelMeanType, ModelVarType, create_diffusion

T = 1000
SHAPE = (6, 3, 4, 4)


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=gen) * 2 - 1
    noise = torch.randn(SHAPE, generator=gen)
    t = torch.tensor([0, 1, 10, 250, 700, 999])
    return x0, noise, t


class _OutputModel:
    """Returns a fixed leaf tensor (so gradients w.r.t. the model output can be inspected) and records x_t."""

    def __init__(self, out):
        self.out = out
        self.seen = []

    def __call__(self, x, t, **kwargs):
        self.seen.append((x.detach().clone(), t.clone()))
        return self.out


def test_create_diffusion_maps_flags_like_dit():
    d = create_diffusion("")
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.EPSILON,
        ModelVarType.LEARNED_RANGE,
        LossType.MSE,
    )
    assert create_diffusion("", learn_sigma=False).model_var_type == ModelVarType.FIXED_LARGE
    assert (
        create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    )
    assert create_diffusion("", use_kl=True).loss_type == LossType.RESCALED_KL
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == LossType.RESCALED_MSE
    assert create_diffusion("", predict_xstart=True).model_mean_type == ModelMeanType.START_X
    assert create_diffusion("", predict_v=True).model_mean_type == ModelMeanType.VELOCITY
    assert create_diffusion("", noise_schedule="cosine").betas[-1] == 0.999


def test_mse_loss_is_the_mean_squared_eps_error():
    d = create_diffusion("", learn_sigma=False)
    x0, noise, t = _data()
    out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    model = _OutputModel(out)
    terms = d.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse"}
    expected = ((noise - out) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["loss"], expected, rtol=1e-6)
    # the model saw x_t = sqrt(abar) x0 + sqrt(1 - abar) eps at the original timesteps
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, T)))[t].view(-1, 1, 1, 1)
    x_t, seen_t = model.seen[0]
    assert torch.equal(seen_t, t)
    assert torch.allclose(
        x_t.double(), abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double(), atol=1e-6
    )


@pytest.mark.parametrize("rescale", [False, True])
def test_hybrid_vb_does_not_train_the_mean(rescale):
    d = create_diffusion("", rescale_learned_sigmas=rescale)
    x0, noise, t = _data()
    out = (torch.randn(6, 6, 4, 4, generator=torch.Generator().manual_seed(5)) * 0.5).requires_grad_()
    terms = d.training_losses(_OutputModel(out), x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])

    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert grad_vb[:, :3].abs().max() == 0  # no VLB gradient into the eps (mean) channels
    assert grad_vb[:, 3:].abs().max() > 0  # the variance channels learn from the VLB
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_mse[:, 3:].abs().max() == 0 and grad_mse[:, :3].abs().max() > 0


def test_rescaled_mse_scales_vb_by_steps_over_1000():
    x0, noise, t = _data()
    t = t % 100
    out = torch.randn(6, 6, 4, 4, generator=torch.Generator().manual_seed(6)) * 0.5
    plain = create_diffusion("100").training_losses(_OutputModel(out), x0, t, noise=noise)
    scaled = create_diffusion("100", rescale_learned_sigmas=True).training_losses(
        _OutputModel(out), x0, t, noise=noise
    )
    assert torch.allclose(scaled["vb"], plain["vb"] * 100 / 1000, rtol=1e-6)


def test_vb_term_matches_gaussian_kl_in_bits(ref):
    """t > 0: KL between the true posterior and the model's Gaussian, mean over dims, / ln 2 (numpy)."""
    d = create_diffusion("")
    x0, noise, t = _data()
    out = torch.randn(6, 6, 4, 4, generator=torch.Generator().manual_seed(7)) * 0.5
    vb = d.training_losses(_OutputModel(out), x0, t, noise=noise)["vb"].double().numpy()

    r = ref.respaced(ref.linear_alpha_bar(T), list(range(T)))
    tn = t.numpy()

    def b(a):
        return a[tn].reshape(-1, 1, 1, 1)

    x0n, nn, outn = x0.double().numpy(), noise.double().numpy(), out.double().numpy()
    x_t = np.sqrt(b(r["abar"])) * x0n + np.sqrt(1 - b(r["abar"])) * nn
    true_mean = b(r["coef_x0"]) * x0n + b(r["coef_xt"]) * x_t
    true_logvar = b(r["post_log_var"])
    pred_x0 = x_t / np.sqrt(b(r["abar"])) - np.sqrt(1 / b(r["abar"]) - 1) * outn[:, :3]
    model_mean = b(r["coef_x0"]) * pred_x0 + b(r["coef_xt"]) * x_t
    frac = (outn[:, 3:] + 1) / 2
    model_logvar = frac * np.log(b(r["beta"])) + (1 - frac) * true_logvar
    kl = 0.5 * (
        -1
        + model_logvar
        - true_logvar
        + np.exp(true_logvar - model_logvar)
        + (true_mean - model_mean) ** 2 * np.exp(-model_logvar)
    )
    expected = kl.mean(axis=(1, 2, 3)) / math.log(2)
    assert ref.rel_err(vb[1:], expected[1:]) < 1e-4  # t = 0 is the decoder NLL, tested below


def test_decoder_nll_uses_the_discretized_likelihood():
    """log of the Gaussian mass of the 2/255-wide bin around x (edge bins open), with ADM's tanh CDF."""
    from scipy.stats import norm

    from diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood

    grid = np.linspace(-6, 6, 2001)
    approx = approx_standard_normal_cdf(torch.from_numpy(grid)).numpy()
    assert np.max(np.abs(approx - norm.cdf(grid))) < 2e-4  # the known accuracy of the tanh approximation

    gen = torch.Generator().manual_seed(8)
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=gen).double() / 127.5 - 1
    x[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both edge bins
    means = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * 0.01
    log_scales = torch.full_like(x, math.log(0.01))
    ours = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales).numpy()

    def cdf(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    xn, mn, s = x.numpy(), means.numpy(), 0.01
    upper = np.where(xn > 0.999, 1.0, cdf((xn + 1 / 255 - mn) / s))
    lower = np.where(xn < -0.999, 0.0, cdf((xn - 1 / 255 - mn) / s))
    assert np.max(np.abs(ours - np.log(np.maximum(upper - lower, 1e-12)))) < 1e-12


def test_kl_loss_is_the_rescaled_vlb():
    x0, noise, t = _data()
    out = torch.randn(6, 6, 4, 4, generator=torch.Generator().manual_seed(9)) * 0.5
    hybrid = create_diffusion("").training_losses(_OutputModel(out), x0, t, noise=noise)
    kl = create_diffusion("", use_kl=True).training_losses(_OutputModel(out), x0, t, noise=noise)
    assert set(kl) == {"loss"} and torch.isfinite(kl["loss"]).all()
    assert torch.allclose(kl["loss"], hybrid["vb"] * T, rtol=1e-5)


def test_v_target_matches_its_definition():
    d = create_diffusion("", learn_sigma=False, predict_v=True)
    x0, noise, t = _data()
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t.numpy()].reshape(-1, 1, 1, 1)
    v = np.sqrt(abar) * noise.double().numpy() - np.sqrt(1 - abar) * x0.double().numpy()
    zero = d.training_losses(_OutputModel(torch.zeros(SHAPE)), x0, t, noise=noise)
    assert np.allclose(zero["mse"].double().numpy(), (v**2).mean(axis=(1, 2, 3)), rtol=1e-5)
    exact = d.training_losses(_OutputModel(torch.from_numpy(v).float()), x0, t, noise=noise)
    assert exact["mse"].max() < 1e-10
    # a v-model that outputs the true v denoises to x0 exactly (up to float32)
    x_t = np.sqrt(abar) * x0.double().numpy() + np.sqrt(1 - abar) * noise.double().numpy()
    pred = d.p_mean_variance(
        _OutputModel(torch.from_numpy(v).float()), torch.from_numpy(x_t).float(), t, clip_denoised=False
    )["pred_xstart"]
    assert torch.allclose(pred, x0, atol=1e-5)


@pytest.mark.parametrize(
    "mean_kw,weighting,formula",
    [
        ({}, LossWeighting("min_snr", gamma=5.0), lambda s: np.minimum(s, 5.0) / s),
        ({"predict_v": True}, LossWeighting("min_snr", gamma=5.0), lambda s: np.minimum(s, 5.0) / (s + 1)),
        ({"predict_xstart": True}, LossWeighting("min_snr", gamma=5.0), lambda s: np.minimum(s, 5.0)),
        ({}, LossWeighting("p2", gamma=0.5, k=1.0), lambda s: 1 / (1 + s) ** 0.5),
    ],
)
def test_loss_weighting_multiplies_the_mse(mean_kw, weighting, formula):
    d = create_diffusion("", **mean_kw)
    x0, noise, t = _data()
    out = torch.randn(6, 6, 4, 4, generator=torch.Generator().manual_seed(10)) * 0.5
    terms = d.training_losses(_OutputModel(out), x0, t, noise=noise, loss_weighting=weighting)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t.numpy()]
    w = formula(abar / (1 - abar))
    assert np.allclose(terms["weight"].double().numpy(), w, rtol=1e-6)
    assert torch.allclose(terms["loss"], torch.from_numpy(w).float() * terms["mse"] + terms["vb"], rtol=1e-6)
    extra = torch.linspace(0.5, 2.0, 6)
    both = d.training_losses(
        _OutputModel(out), x0, t, noise=noise, loss_weighting=weighting, mse_weight=extra
    )
    assert torch.allclose(both["weight"], terms["weight"] * extra)


def test_weighting_is_rejected_for_kl_loss():
    x0, noise, t = _data()
    with pytest.raises(DiffusionError, match="KL"):
        create_diffusion("", use_kl=True).training_losses(
            _OutputModel(torch.zeros(6, 6, 4, 4)), x0, t, noise=noise, loss_weighting=LossWeighting("p2")
        )


def test_input_perturbation_keeps_the_target_and_noise_offset_is_per_channel():
    d = create_diffusion("", learn_sigma=False)
    x0, noise, t = _data()
    model = _OutputModel(noise)
    torch.manual_seed(0)  # training_losses may use the global RNG for its extra noise
    terms = d.training_losses(model, x0, t, noise=noise, input_perturbation=0.1)
    assert terms["mse"].max() == 0  # target is still the unperturbed eps
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, T)))[t].view(-1, 1, 1, 1)
    clean_x_t = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    assert not torch.allclose(model.seen[0][0].double(), clean_x_t, atol=1e-3)

    zero_model = _OutputModel(torch.zeros(SHAPE))
    d.training_losses(zero_model, torch.zeros(SHAPE), t, noise=torch.zeros(SHAPE), noise_offset=0.1)
    x_t = zero_model.seen[0][0]  # = sqrt(1 - abar) * offset * n[b, c]: constant over H, W
    assert torch.allclose(x_t, x_t[:, :, :1, :1].expand_as(x_t)) and x_t.abs().max() > 0
