"""Gaussian diffusion (DDPM / improved DDPM / DDIM) with ADM's semantics.

Schedule arrays are float64 numpy [T]; they are cast to float32 tensors where used (float64 when the
data are float64). Timesteps t are indices 0..T-1 into those arrays. Sampling loops never touch the
global RNG: every fresh normal draw comes from the caller's ``noise_fn(like) -> Tensor``.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

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

ModelFn = Callable[..., Any]
NoiseFn = Callable[[Tensor], Tensor]

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


def extract_into_tensor(
    arr: np.ndarray, t: Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """arr[t] as a tensor of `dtype` on t's device, broadcast to `shape` ([B] -> [B, 1, ..., 1] -> shape)."""
    values = torch.from_numpy(arr).to(dtype=dtype).to(t.device)[t]
    values = values.view(-1, *([1] * (len(shape) - 1)))
    return values.expand(*shape).contiguous()  # a real tensor, safe for in-place use by callers


def fresh_noise(noise_fn: NoiseFn | None, like: Tensor, what: str) -> Tensor:
    """Standard normal noise shaped like `like`, from the caller's noise_fn (never the global RNG)."""
    if noise_fn is None:
        raise DiffusionError(
            f"{what} needs fresh noise but no noise_fn was given (pass noise_fn=SampleNoise(...))"
        )
    noise = noise_fn(like)
    if tuple(noise.shape) != tuple(like.shape):
        raise DiffusionError(f"noise_fn returned shape {tuple(noise.shape)}, expected {tuple(like.shape)}")
    return noise.to(device=like.device, dtype=like.dtype)


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


def _last(steps: Iterator[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The final item of a sampling loop (there is always at least one step)."""
    return collections.deque(steps, maxlen=1)[0]


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
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)   (DDPM eq. 4)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I)   (DDPM eqs. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: the log is clipped by repeating beta~_1 at t = 0.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.array([], dtype=np.float64)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.snr = snr(self.alphas_cumprod)

    # ----------------------------------------------------------------- forward process

    def _extract(self, arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
        return extract_into_tensor(arr, t, like.shape, _compute_dtype(like))

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0), each shaped like x_start."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with the caller's noise eps [B, C, ...]."""
        if noise is None:
            raise DiffusionError("q_sample needs explicit noise")
        if noise.shape != x_start.shape:
            raise DiffusionError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise DiffusionError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- conversions between targets

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        # x_0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def _predict_xstart_from_xprev(self, x_t: Tensor, t: Tensor, xprev: Tensor) -> Tensor:
        # invert mean = coef1 x_0 + coef2 x_t
        return (
            self._extract(1.0 / self.posterior_mean_coef1, t, x_t) * xprev
            - self._extract(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t) * x_t
        )

    def _predict_xstart_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        # x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def velocity_target(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * noise
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
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
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise DiffusionError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output, extra = _split_extra(model(x, t, **model_kwargs))

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
                min_log = self._extract(self.posterior_log_variance_clipped, t, x)
                max_log = self._extract(np.log(self.betas), t, x)
                frac = (var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta_t, with beta~_1 at t = 0 for a better decoder likelihood (as ADM)
                variance = np.append(self.posterior_variance[1], self.betas[1:])
                log_variance = np.log(variance)
            else:
                variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = self._extract(variance, t, x)
            model_log_variance = self._extract(log_variance, t, x)

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

    def p_sample(
        self,
        model: ModelFn,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> dict[str, Tensor]:
        """Ancestral step x_t -> x_{t-1} = mean + sigma z (no noise at t = 0): dict(sample, pred_xstart)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = fresh_noise(noise_fn, x, "p_sample")  # drawn at every step, t = 0 included, as ADM
        nonzero_mask = (t != 0).to(out["mean"].dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _initial_noise(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None,
        device: Any,
        noise_fn: NoiseFn | None,
    ) -> tuple[Tensor, torch.device]:
        if not isinstance(shape, (tuple, list)):
            raise DiffusionError(f"shape must be a tuple or list, got {type(shape).__name__}")
        device = _resolve_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise DiffusionError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise.to(device), device
        return fresh_noise(noise_fn, torch.empty(*shape, device=device), "initial x_T"), device

    def _timesteps(self, progress: bool) -> Sequence[int] | Iterator[int]:
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            return tqdm(indices)
        return indices

    def p_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        device: Any = None,
        progress: bool = False,
        noise_fn: NoiseFn | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Ancestral sampling from x_T; yields p_sample's dict at each t = T-1 .. 0."""
        img, device = self._initial_noise(model, shape, noise, device, noise_fn)
        for i in self._timesteps(progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, noise_fn)
            yield out
            img = out["sample"]

    def p_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        device: Any = None,
        progress: bool = False,
        noise_fn: NoiseFn | None = None,
    ) -> Tensor:
        """Samples [*shape] by ancestral sampling (DDPM Algorithm 2)."""
        steps = self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, noise_fn
        )
        return _last(steps)["sample"]

    def ddim_sample(
        self,
        model: ModelFn,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        noise_fn: NoiseFn | None = None,
    ) -> dict[str, Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic and draws no noise."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # re-derive eps from x_0 so that every mean type works
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        # sigma_t = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)   (eq. 16)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        if eta == 0:
            sample = mean_pred
        else:
            noise = fresh_noise(noise_fn, x, "ddim_sample with eta > 0")
            nonzero_mask = (t != 0).to(mean_pred.dtype).view(-1, *([1] * (x.ndim - 1)))
            sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: ModelFn,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """Deterministic DDIM inversion step x_t -> x_{t+1}."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract(self.alphas_cumprod_next, t, x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        device: Any = None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: NoiseFn | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """DDIM sampling from x_T; yields ddim_sample's dict at each t = T-1 .. 0."""
        img, device = self._initial_noise(model, shape, noise, device, noise_fn)
        for i in self._timesteps(progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, eta, noise_fn)
            yield out
            img = out["sample"]

    def ddim_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        device: Any = None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: NoiseFn | None = None,
    ) -> Tensor:
        """Samples [*shape] with DDIM."""
        steps = self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta, noise_fn
        )
        return _last(steps)["sample"]

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
        snr_t = torch.from_numpy(self.snr[t.detach().cpu().numpy()])  # [B] float64
        return loss_weighting.weight(snr_t, target).to(device=t.device, dtype=torch.float32)

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

    def _prior_bpd(self, x_start: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, [B]."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / LOG2

    def calc_bpd_loop(
        self,
        model: ModelFn,
        x_start: Tensor,
        noise_fn: NoiseFn,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """The full VLB in bits/dim: dict(total_bpd, prior_bpd, vb [B, T], xstart_mse [B, T], mse [B, T])."""
        vb, xstart_mse, mse = [], [], []
        for i in list(range(self.num_timesteps))[::-1]:
            t = torch.full((x_start.shape[0],), i, device=x_start.device, dtype=torch.long)
            noise = fresh_noise(noise_fn, x_start, "calc_bpd_loop")
            x_t = self.q_sample(x_start, t, noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
