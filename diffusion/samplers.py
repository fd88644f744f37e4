"""Named samplers over a checkpoint's own noise schedule: ADM's DDPM and DDIM, and diffusers' solvers.

    sampler = Sampler("dpm++2m", 15, noise_schedule="linear", diffusion_steps=1000, predict_v=False)
    x0 = sampler(model_fn, x_T, noise=SampleNoise(seeds), model_kwargs={"y": y}, clip_denoised=False)
    sampler.nfe  # model evaluations per image (a guided evaluation is one call over the doubled batch)

Every sampler is a step function run by the one loop driver (diffusion.loop.sample_loop), so guidance
(including its interval), the per-sample random streams and the no-host-sync rules are the same for all.
The diffusers samplers wrap the library's scheduler classes (set_timesteps, scale_model_input, step), built
from our betas (`trained_betas`, linear or cosine, the checkpoint's number of training steps) and its
prediction type; a learned-sigma output gives its first half (the eps or v part). Stochastic noise comes
from the caller's per-sample generators (passed to step() as `variance_noise`, the same numbers diffusers
would draw from a list of CPU generators).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from torch import Tensor

from diffusion import DEFAULT_DIFFUSION_STEPS, create_diffusion
from diffusion.loop import Denoise, ModelFn, StepFn, Timestep, sample_loop
from diffusion.schedules import LINEAR, DiffusionError, get_named_beta_schedule

DDPM, DDIM = "ddpm", "ddim"
DPMPP_2M, DPMPP_2M_SDE, UNIPC, EULER, HEUN = "dpm++2m", "dpm++2m-sde", "unipc", "euler", "heun"
SAMPLER_NAMES = (DDPM, DDIM, DPMPP_2M, DPMPP_2M_SDE, UNIPC, EULER, HEUN)

# diffusers scheduler class and the settings that differ from its defaults, per sampler name. The step
# placement is each solver's own recommendation, measured on the demo model (docs/BENCHMARKS.md, "Samplers"):
# the multistep solvers step uniformly in log-SNR (DPM-Solver's "logSNR" spacing; diffusers' default, uniform
# in t, ends its last step at sigma 0.23 for 15 steps and leaves most of the error there), Heun takes EDM's
# (Karras) noise levels (uniform in t its first step jumps from sigma 157 to ~1: error 0.25 at 15 NFE, not
# 0.07), Euler keeps the default, which measured best for it.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    DPMPP_2M: ("DPMSolverMultistepScheduler",
               {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_lu_lambdas": True}),
    DPMPP_2M_SDE: ("DPMSolverMultistepScheduler",
                   {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_lu_lambdas": True}),
    UNIPC: ("UniPCMultistepScheduler", {"use_exponential_sigmas": True}),
    EULER: ("EulerDiscreteScheduler", {}),
    HEUN: ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
}
STOCHASTIC = frozenset({DPMPP_2M_SDE})  # a fresh normal draw at every step
MULTISTEP = frozenset({DPMPP_2M, DPMPP_2M_SDE, UNIPC})  # divide by the log-SNR step: no noise level twice
PREDICTION_EPSILON, PREDICTION_V = "epsilon", "v_prediction"  # diffusers' prediction_type values
CLIP = 1.0  # clip_denoised keeps the predicted x_0 in [-CLIP, CLIP] (pixel data)
# The fewest steps each sampler makes sense with, and why (measured on the demo model; below them the images are
# flat or saturated, or the schedule cannot be built). Samplers not listed work from one step.
MIN_STEPS: dict[str, tuple[int, str]] = {
    DDPM: (2, "one respaced step leaves no posterior to sample from"),
    DDIM: (2, "one step cannot be cut from the schedule with an integer stride"),
    EULER: (2, "with one step diffusers places its only model call at t = 0: the images come out flat grey"),
    HEUN: (6, "Karras noise levels over fewer steps take a first step from sigma 157 that saturates most pixels "
              "(97% at 2 steps, 50% at 4)"),
}


def min_steps(name: str) -> int:
    """The fewest sampling steps sampler `name` accepts."""
    return MIN_STEPS.get(name, (1, ""))[0]


def check_steps(name: str, steps: int, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS) -> None:
    """DiffusionError (one line) when `steps` is below the sampler's minimum or above the training steps."""
    low, why = MIN_STEPS.get(name, (1, ""))
    if steps < low:
        raise DiffusionError(f"{name} needs at least {low} steps ({why}), got {steps}")
    if steps > diffusion_steps:
        raise DiffusionError(f"sampling steps must be at most the {diffusion_steps} training steps, got {steps}")


def make_scheduler(name: str, betas: np.ndarray, predict_v: bool) -> Any:
    """A fresh diffusers scheduler for sampler `name`, on the given training betas [T] (float64)."""
    import diffusers  # the library takes seconds to import; only these samplers need it

    class_name, settings = SCHEDULERS[name]
    return getattr(diffusers, class_name)(
        num_train_timesteps=len(betas),
        trained_betas=betas.tolist(),
        prediction_type=PREDICTION_V if predict_v else PREDICTION_EPSILON,
        **settings,
    )


class Sampler:
    """Sampler `name` with `steps` steps over a checkpoint's diffusion (schedule, training steps, target).

    Call it with (model_fn, x_T, noise=..., model_kwargs=..., clip_denoised=...). `nfe`: model_fn calls per
    image (Heun: two per step but one on the last). One call at a time (diffusers schedulers keep state).
    """

    def __init__(
        self,
        name: str,
        steps: int,
        *,
        noise_schedule: str = LINEAR,
        diffusion_steps: int = DEFAULT_DIFFUSION_STEPS,
        predict_v: bool = False,
        learn_sigma: bool = True,
        eta: float = 0.0,
    ) -> None:
        if name not in SAMPLER_NAMES:
            raise DiffusionError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLER_NAMES)}")
        check_steps(name, steps, diffusion_steps)
        if eta != 0 and name != DDIM:
            raise DiffusionError(f"eta applies to the ddim sampler only, not {name!r}")
        self.name, self.steps, self.eta, self.learn_sigma = name, steps, eta, learn_sigma
        self.predict_v = predict_v
        if name in (DDPM, DDIM):
            respacing = str(steps) if name == DDPM else f"ddim{steps}"
            self.diffusion = create_diffusion(respacing, noise_schedule=noise_schedule, learn_sigma=learn_sigma,
                                              diffusion_steps=diffusion_steps, predict_v=predict_v)
            self.scheduler = None
        else:
            betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
            self.scheduler = make_scheduler(name, betas, predict_v)
        self.timesteps = self._timesteps()
        if name in MULTISTEP:
            distinct = len(np.unique(self.scheduler.sigmas[:steps].numpy()))
            if distinct < steps:
                raise DiffusionError(f"{name} with {steps} steps visits a noise level of the {diffusion_steps}-step "
                                     f"schedule twice (a zero step, which gives NaN); use at most {distinct} steps")

    @property
    def nfe(self) -> int:
        """Model evaluations per image."""
        return len(self.timesteps)

    def describe(self) -> dict[str, Any]:
        """What a manifest should record: name, steps, NFE, the model's timesteps, the scheduler and its settings."""
        out: dict[str, Any] = {"sampler": self.name, "steps": self.steps, "nfe": self.nfe,
                               "model_timesteps": [ts.model_t for ts in self.timesteps]}
        if self.name == DDIM:
            out["eta"] = self.eta
        if self.scheduler is not None:
            class_name, settings = SCHEDULERS[self.name]
            out["scheduler"] = {"class": class_name, "prediction_type": self.scheduler.config.prediction_type,
                                "num_train_timesteps": self.scheduler.config.num_train_timesteps, **settings}
        return out

    def __call__(
        self,
        model_fn: ModelFn,
        x_T: Tensor,
        *,
        noise: Any = None,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
        progress: bool = False,
    ) -> Tensor:
        """x_0 [B, C, ...] from x_T ~ N(0, I) (unscaled). noise: SampleNoise or a noise_fn, for noisy samplers."""
        if self.scheduler is None:
            step = self._adm_step(clip_denoised)
        else:
            self.timesteps = self._timesteps()  # set_timesteps resets the scheduler's state for a new batch
            step = self._scheduler_step(clip_denoised)
            x_T = x_T * float(self.scheduler.init_noise_sigma)
        return sample_loop(step, model_fn, x_T, self.timesteps, noise=noise, model_kwargs=model_kwargs,
                           progress=progress)

    def _timesteps(self) -> list[Timestep]:
        if self.scheduler is None:
            noisy = self.name == DDPM or self.eta != 0
            return self.diffusion.sampling_timesteps(noisy)
        self.scheduler.set_timesteps(self.steps)
        noisy = self.name in STOCHASTIC
        return [Timestep(i, t, noisy) for i, t in enumerate(self.scheduler.timesteps.tolist())]

    def _adm_step(self, clip_denoised: bool) -> StepFn:
        if self.name == DDPM:
            return functools.partial(self.diffusion.ancestral_step, clip_denoised=clip_denoised)
        return functools.partial(self.diffusion.ddim_step, clip_denoised=clip_denoised, eta=self.eta)

    def _scheduler_step(self, clip_denoised: bool) -> StepFn:
        scheduler = self.scheduler

        def step(denoise: Denoise, x: Tensor, ts: Timestep, z: Tensor | None) -> tuple[Tensor, Tensor | None]:
            t = scheduler.timesteps[ts.index]
            x_in = scheduler.scale_model_input(x, t)  # the variance-preserving x_t the model was trained on
            sigma = float(scheduler.sigmas[ts.index])  # this step's noise level (t may be rounded from it)
            prediction = self._prediction(denoise(x_in), x_in, sigma, clip_denoised)
            extra = {} if z is None else {"variance_noise": z}
            out = scheduler.step(prediction, t, x, **extra)
            return out.prev_sample, getattr(out, "pred_original_sample", None)

        return step

    def _prediction(self, output: Tensor, x_in: Tensor, sigma: float, clip_denoised: bool) -> Tensor:
        """The eps (or v) part of the model output, in x's dtype; with clip_denoised, adjusted so that the
        x_0 it implies lies in [-1, 1] (as ADM clips x_0 and re-derives eps for DDIM). sigma: the step's noise
        level in diffusers' units, sqrt((1 - alpha_bar) / alpha_bar)."""
        C = x_in.shape[1]
        expected = 2 * C if self.learn_sigma else C
        if output.shape[1] != expected:
            raise DiffusionError(f"model output has {output.shape[1]} channels, expected {expected}")
        prediction = output[:, :C].to(x_in.dtype)
        if not clip_denoised:
            return prediction
        alpha_bar = 1.0 / (1.0 + sigma**2)
        a, s = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
        # x_0 = (x_t - s eps) / a  or  x_0 = a x_t - s v;  clipping moves x_0 by d
        x0 = a * x_in - s * prediction if self.predict_v else (x_in - s * prediction) / a
        d = x0 - x0.clamp(-CLIP, CLIP)
        return prediction + d / s if self.predict_v else prediction + (a / s) * d
