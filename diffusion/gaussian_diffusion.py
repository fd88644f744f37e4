"""Gaussian diffusion (DDPM / improved DDPM / DDIM) with ADM's semantics.

Schedule arrays are float64 numpy [T]; they are cast to float32 tensors where used (float64 when the
data are float64) and kept on the device, one copy per (device, dtype). Timesteps t are indices 0..T-1
into those arrays. Sampling runs through the one loop driver (diffusion.loop) with the ancestral and
DDIM step functions below; it never touches the global RNG: every fresh normal draw comes from the
caller's noise source (``noise_fn(like) -> Tensor``, or SampleNoise, which draws ahead of use).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusion.loop import Denoise, ModelFn, NoiseFn, StepFn, Timestep, sample_loop
from diffusion.losses import (
    TARGET_EPSILON,
    TARGET_START_X,
    TARGET_VELOCITY,
    WEIGHTING_NONE,
    LossWeighting,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    snr,
)
from diffusion.schedules import DiffusionError

LOG2 = math.log(2.0)
# ADM's RESCALED_MSE multiplies the VLB term by T/1000 (parity with its first 1000-step implementation).
VB_RESCALE_REFERENCE_STEPS = 1000.0
CLIP_RANGE = (-1.0, 1.0)


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1} (the posterior mean)
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps
    VELOCITY = enum.auto()  # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from."""

    LEARNED = enum.auto()  # the network outputs log variance
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # network outputs v in [-1, 1]: interpolate log beta~_t .. log beta_t


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the target (+ VLB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, VLB term scaled by T/1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the VLB times T (estimates the full bound)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


_TARGET_NAMES = {
    ModelMeanType.EPSILON: TARGET_EPSILON,
    ModelMeanType.VELOCITY: TARGET_VELOCITY,
    ModelMeanType.START_X: TARGET_START_X,
}


def _compute_dtype(like: Tensor) -> torch.dtype:
    """float64 data stay float64; everything else (fp32, bf16, fp16) is computed in float32 as in ADM."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _resolve_device(model: ModelFn, noise: Tensor | None, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _missing_noise(what: str) -> DiffusionError:
    return DiffusionError(f"{what} needs fresh noise but no noise_fn was given (pass noise_fn=SampleNoise(...))")


def _split_extra(output: Any) -> tuple[Tensor, Any]:
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, None


class GaussianDiffusion:
    """Training and sampling utilities for a diffusion process with the given betas [T] (float64)."""

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
    ) -> None:
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise DiffusionError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)  # abar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # abar_{t-1}, abar_{-1} = 1

        # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)   (DDPM eq. 4)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.log_betas = np.log(betas)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I)   (DDPM eqs. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: the log is clipped by repeating beta~_1 at t = 0. FIXED_LARGE uses beta_t, with beta~_1
        # at t = 0 for a better decoder likelihood (as ADM).
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
            self.large_variance = np.append(self.posterior_variance[1], self.betas[1:])
        else:
            self.posterior_log_variance_clipped = np.array([], dtype=np.float64)
            self.large_variance = np.array([], dtype=np.float64)
        self.large_log_variance = np.log(self.large_variance)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # x_0 from x_{t-1}: invert mean = coef1 x_0 + coef2 x_t
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self.snr = snr(self.alphas_cumprod)
        self.timestep_map: list[int] = list(range(self.num_timesteps))  # the model's timestep of each step
        self._tables: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    # ----------------------------------------------------------------- schedule tensors on the device

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The schedule array `name` as a tensor [T] of `dtype` on `device`, copied there once and cached."""
        key = (name, device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = torch.from_numpy(getattr(self, name)).to(dtype=dtype).to(device)
        return table

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Schedule array `name` at timesteps t [B], broadcast to like's shape ([B] -> [B, 1, ..., 1] -> shape)."""
        values = self._table(name, t.device, _compute_dtype(like))[t]
        values = values.view(-1, *([1] * (like.ndim - 1)))
        return values.expand(*like.shape).contiguous()  # a real tensor, safe for in-place use by callers

    # ----------------------------------------------------------------- forward process

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with the caller's noise eps [B, C, ...]."""
        if noise is None:
            raise DiffusionError("q_sample needs explicit noise")
        if noise.shape != x_start.shape:
            raise DiffusionError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise DiffusionError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- conversions between targets

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        # x_0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def _predict_xstart_from_xprev(self, x_t: Tensor, t: Tensor, xprev: Tensor) -> Tensor:
        # invert mean = coef1 x_0 + coef2 x_t
        return (
            self._extract("recip_posterior_mean_coef1", t, x_t) * xprev
            - self._extract("posterior_mean_coef2_over_coef1", t, x_t) * x_t
        )

    def _predict_xstart_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        # x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return (
            self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v
        )

    def velocity_target(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * noise
            - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    # ----------------------------------------------------------------- reverse process

    def p_mean_variance(
        self,
        model: ModelFn,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Any]:
        """p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart, extra), tensors shaped like x."""
        model_kwargs = model_kwargs or {}
        if t.shape != (x.shape[0],):
            raise DiffusionError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        output = self._wrap_model(model)(x, t, **model_kwargs)
        return self._reverse_from_output(output, x, t, clip_denoised, denoised_fn)

    def _wrap_model(self, model: ModelFn) -> ModelFn:
        """The model as called with step indices t (a respaced process maps them to its original timesteps)."""
        return model

    def _reverse_from_output(
        self,
        output: Any,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool,
        denoised_fn: Callable[[Tensor], Tensor] | None,
    ) -> dict[str, Any]:
        """p_mean_variance's dict from the model's output at x [B, C, ...] and step indices t [B]."""
        B, C = x.shape[:2]
        model_output, extra = _split_extra(output)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, 2 * C, *x.shape[2:]):
                raise DiffusionError(
                    f"learned-variance model must output {2 * C} channels, got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)  # [B, C, ...] each
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                # improved DDPM eq. 15: log Sigma = v log beta_t + (1 - v) log beta~_t, v = frac in [0, 1]
                min_log = self._extract("posterior_log_variance_clipped", t, x)
                max_log = self._extract("log_betas", t, x)
                frac = (var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            model_variance = self._extract("large_variance", t, x)
            model_log_variance = self._extract("large_log_variance", t, x)
        else:
            model_variance = self._extract("posterior_variance", t, x)
            model_log_variance = self._extract("posterior_log_variance_clipped", t, x)

        def process_xstart(x0: Tensor) -> Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(*CLIP_RANGE) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            elif self.model_mean_type == ModelMeanType.VELOCITY:
                pred_xstart = process_xstart(self._predict_xstart_from_v(x, t, model_output))
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    # ----------------------------------------------------------------- step functions (diffusion.loop)

    def sampling_timesteps(self, noisy: bool) -> list[Timestep]:
        """The loop's steps k = T'-1 .. 0; the model sees timestep_map[k]; noisy steps (all but k = 0)."""
        return [Timestep(k, self.timestep_map[k], noisy and k != 0) for k in reversed(range(self.num_timesteps))]

    def ancestral_step(
        self,
        denoise: Denoise,
        x: Tensor,
        ts: Timestep,
        noise: Tensor | None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """DDPM Algorithm 2: x_{t-1} = mean + sigma z (z = noise; none at k = 0) -> (x_{t-1}, pred x_0)."""
        t = torch.full((x.shape[0],), ts.index, device=x.device, dtype=torch.long)
        out = self._reverse_from_output(denoise(x), x, t, clip_denoised, denoised_fn)
        if noise is None:
            return out["mean"], out["pred_xstart"]
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise, out["pred_xstart"]

    def ddim_step(
        self,
        denoise: Denoise,
        x: Tensor,
        ts: Timestep,
        noise: Tensor | None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        eta: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12) -> (x_{t-1}, pred x_0); eta = 0 is deterministic."""
        t = torch.full((x.shape[0],), ts.index, device=x.device, dtype=torch.long)
        out = self._reverse_from_output(denoise(x), x, t, clip_denoised, denoised_fn)
        # re-derive eps from x_0 so that every mean type works
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        # sigma_t = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)   (eq. 16)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        sample = mean_pred if noise is None else mean_pred + sigma * noise
        return sample, out["pred_xstart"]

    # ----------------------------------------------------------------- the official loops (thin calls of the driver)

    def p_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        cond_fn: Callable[..., Any] | None = None,
        model_kwargs: dict | None = None,
        device: Any = None,
        progress: bool = False,
        noise_fn: NoiseFn | None = None,
    ) -> Tensor:
        """Samples [*shape] by ancestral sampling (DDPM Algorithm 2); DiT's signature plus noise_fn."""
        step = functools.partial(self.ancestral_step, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
        x_T = self._start(model, shape, noise, device, noise_fn, cond_fn)
        return self._loop(step, model, x_T, True, "p_sample", noise_fn, model_kwargs, progress)

    def ddim_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        cond_fn: Callable[..., Any] | None = None,
        model_kwargs: dict | None = None,
        device: Any = None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: NoiseFn | None = None,
    ) -> Tensor:
        """Samples [*shape] with DDIM (eta = 0: deterministic); DiT's signature plus noise_fn."""
        step = functools.partial(self.ddim_step, clip_denoised=clip_denoised, denoised_fn=denoised_fn, eta=eta)
        x_T = self._start(model, shape, noise, device, noise_fn, cond_fn)
        return self._loop(step, model, x_T, eta != 0, "ddim_sample with eta > 0", noise_fn, model_kwargs, progress)

    def _start(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None,
        device: Any,
        noise_fn: NoiseFn | None,
        cond_fn: Callable[..., Any] | None,
    ) -> Tensor:
        """x_T [*shape]: the given noise, else one draw of noise_fn, on the model's (or the given) device."""
        if cond_fn is not None:
            raise DiffusionError("cond_fn (classifier guidance) is not supported; use guided_model for CFG")
        if not isinstance(shape, (tuple, list)):
            raise DiffusionError(f"shape must be a tuple or list, got {type(shape).__name__}")
        device = _resolve_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise DiffusionError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise.to(device)
        if noise_fn is None:
            raise _missing_noise("initial x_T")
        like = torch.empty(*shape, device=device)
        x_T = noise_fn(like)
        if tuple(x_T.shape) != tuple(shape):
            raise DiffusionError(f"noise_fn returned shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        return x_T.to(device=device, dtype=like.dtype)

    def _loop(
        self,
        step: StepFn,
        model: ModelFn,
        x_T: Tensor,
        noisy: bool,
        what: str,
        noise_fn: NoiseFn | None,
        model_kwargs: dict | None,
        progress: bool,
    ) -> Tensor:
        timesteps = self.sampling_timesteps(noisy)
        if noise_fn is None and any(ts.noisy for ts in timesteps):
            raise _missing_noise(what)
        return sample_loop(step, model, x_T, timesteps, noise=noise_fn, model_kwargs=model_kwargs, progress=progress)

    # ----------------------------------------------------------------- losses

    def _vb_terms_bpd(
        self,
        model: ModelFn,
        x_start: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """A VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or -log p(x_0|x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / LOG2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / LOG2
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def _mse_target(self, x_start: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            return self.q_posterior_mean_variance(x_start, x_t, t)[0]
        if self.model_mean_type == ModelMeanType.START_X:
            return x_start
        if self.model_mean_type == ModelMeanType.VELOCITY:
            return self.velocity_target(x_start, t, noise)
        return noise

    def loss_weight(self, t: Tensor, loss_weighting: LossWeighting) -> Tensor | None:
        """Per-sample MSE weights [B] (float32, on t's device) from SNR(t), or None for no weighting."""
        if loss_weighting.kind == WEIGHTING_NONE:
            return None
        target = _TARGET_NAMES.get(self.model_mean_type)
        if target is None:
            raise DiffusionError(
                f"loss weighting {loss_weighting.kind!r} is not defined for {self.model_mean_type.name}"
            )
        snr_t = self._table("snr", t.device, torch.float64)[t]  # [B] float64, on t's device (no host sync)
        return loss_weighting.weight(snr_t, target).to(dtype=torch.float32)

    def training_losses(
        self,
        model: ModelFn,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
        loss_weighting: LossWeighting | None = None,
        mse_weight: Tensor | None = None,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
    ) -> dict[str, Tensor]:
        """Per-sample losses [B] for timesteps t [B]: dict(loss, mse, vb when the variance is learned).

        loss = w * mse + vb, w = loss_weighting(SNR_t) * mse_weight (each optional; "mse" stays unweighted,
        "weight" holds w when used). noise=None draws torch.randn_like (global RNG: training only).
        noise_offset adds offset * N(0, 1) per (sample, channel) to the noise (Guttenberg 2023);
        input_perturbation noises x_t with eps + gamma * N(0, 1), the target keeps eps (Ning et al. 2023).
        """
        model_kwargs = model_kwargs or {}
        model = self._wrap_model(model)
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(
                *x_start.shape[:2], *([1] * (x_start.ndim - 2)), device=x_start.device, dtype=noise.dtype
            )
        noise_in = noise + input_perturbation * torch.randn_like(noise) if input_perturbation else noise
        x_t = self.q_sample(x_start, t, noise=noise_in)
        terms: dict[str, Tensor] = {}

        if self.loss_type.is_vb():
            if (
                loss_weighting is not None and loss_weighting.kind != WEIGHTING_NONE
            ) or mse_weight is not None:
                raise DiffusionError(
                    "loss weighting applies to the MSE term; it cannot be used with a KL loss"
                )
            terms["loss"] = self._vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if model_output.shape != (B, 2 * C, *x_t.shape[2:]):
                raise DiffusionError(
                    f"learned-variance model must output {2 * C} channels, got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            # improved DDPM hybrid loss: the VLB trains the variance only (stop-gradient on the mean)
            frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, r=frozen_out, **kwargs: r, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / VB_RESCALE_REFERENCE_STEPS)

        target = self._mse_target(x_start, x_t, t, noise)
        if model_output.shape != target.shape:
            raise DiffusionError(
                f"model output shape {tuple(model_output.shape)} != target {tuple(target.shape)}"
            )
        terms["mse"] = mean_flat((target - model_output) ** 2)

        weight = self.loss_weight(t, loss_weighting) if loss_weighting is not None else None
        if mse_weight is not None:
            weight = mse_weight if weight is None else weight * mse_weight
        weighted_mse = terms["mse"] if weight is None else weight * terms["mse"]
        if weight is not None:
            terms["weight"] = weight
        terms["loss"] = weighted_mse + terms["vb"] if "vb" in terms else weighted_mse
        return terms
