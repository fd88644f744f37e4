"""Flow-matching samplers for SiT and REPA networks, with the call shape of ``diffusion.samplers.Sampler``.

    sampler = FlowSampler("euler-maruyama", 250, family="sit")
    x0 = sampler(model_fn, x_T, noise=SampleNoise(seeds), model_kwargs={"y": y})
    sampler.nfe, sampler.describe()

One time convention for the user, REPA's: t = 1 is noise, t = 0 data, x_t = (1 - t) x + t noise, and the
velocity v = dx_t/dt = noise - x. Every sampler integrates from t = 1 to t = 0 in that convention; the
guidance interval (``guided_model(..., interval=(low, high))``) is in it too (REPA's guidance_low/high).
Each family's network keeps its own convention and is converted at the call:

- ``sit`` (SiT, and the flow models this project trains): the network's t is 0 at noise, so it is called at
  t_net = 1 - t and its velocity (x - noise, d/dt_net) is -v;
- ``repa``: the network's t is the user's t and its velocity is v.

``model_fn(x, t_net [B], **model_kwargs)`` is the network (optionally wrapped by ``guided_model``) and returns
the velocity only (``models.sit.SiT``: the first half of a learned-sigma output). Random numbers: the caller
draws x_T, the stochastic sampler (euler-maruyama) takes ONE float32 draw shaped like x_T per stochastic step,
in order, from ``noise`` (a ``SampleNoise`` or a noise_fn); nothing uses the global generator.

The samplers:

- ``euler``, ``heun``: REPA's euler_sampler, N intervals of linspace(1, 0, N + 1); heun corrects every
  step but the last with the trapezoid rule (NFE 2N - 1); float64 state, network in x_T's dtype.
- ``euler-maruyama``: REPA's euler_maruyama_sampler, which is SiT's default SDE (diffusion w_t = sigma_t,
  last step "Mean" of size 0.04): t = linspace(1, 0.04, N), then 0. N - 1 steps
  x += (v - t s) dt + sqrt(2 t |dt|) eps with the score s = -(x + (1 - t) v) / t, then a deterministic
  mean step from 0.04 to 0. NFE N.
- ``dopri5``: SiT's default ODE, torchdiffeq's adaptive Dormand-Prince (atol 1e-6, rtol 1e-3), integrated
  in SiT's direction (s = 1 - t from 0 to 1) in x_T's dtype. Its step sizes depend on the whole batch, so a
  sample's image depends on the batch it was drawn in (describe() says so); NFE known after a call.
- ``dpm++2m``, ``unipc``: diffusers' DPMSolverMultistepScheduler (DPM-Solver++ 2M) and
  UniPCMultistepScheduler on flow sigmas (``use_flow_sigmas``, ``prediction_type="flow_prediction"``, shift 1;
  sigma is the user's t), for 10-25 model calls. NFE N.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion.loop import ModelFn, model_for_timestep, open_noise
from diffusion.samplers import SAMPLER_NAMES
from diffusion.schedules import DiffusionError

FAMILY_DIT, FAMILY_SIT, FAMILY_REPA = "dit", "sit", "repa"
FAMILIES = (FAMILY_DIT, FAMILY_SIT, FAMILY_REPA)
FLOW_FAMILIES = (FAMILY_SIT, FAMILY_REPA)
TIME_CONVENTION = "t=1 noise, t=0 data; x_t = (1 - t) x + t noise; v = dx_t/dt = noise - x (REPA's)"
NETWORK_TIME = {
    FAMILY_SIT: "network t = 1 - t, network velocity = -v (SiT: t=0 noise, t=1 data)",
    FAMILY_REPA: "network t = t, network velocity = v (REPA: t=1 noise)",
}

EULER, HEUN, EULER_MARUYAMA, DOPRI5, DPMPP_2M, UNIPC = "euler", "heun", "euler-maruyama", "dopri5", "dpm++2m", "unipc"
FLOW_SAMPLER_NAMES = (EULER, HEUN, EULER_MARUYAMA, DOPRI5, DPMPP_2M, UNIPC)
SAMPLERS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    FAMILY_DIT: SAMPLER_NAMES,
    FAMILY_SIT: FLOW_SAMPLER_NAMES,
    FAMILY_REPA: FLOW_SAMPLER_NAMES,
}
MIN_STEPS: dict[str, tuple[int, str]] = {  # the fewest steps each sampler takes, and why
    EULER: (1, "one step goes from t=1 to t=0"),
    HEUN: (1, "one step goes from t=1 to t=0"),
    EULER_MARUYAMA: (2, "its grid linspace(1, 0.04, steps) needs a stochastic step from t=1 before the final "
                        "mean step from 0.04 to 0; with 1 step the grid holds t=1 alone"),
    DOPRI5: (2, "as in SiT, steps counts the points of linspace(0, 1, steps) (they do not change the result); "
                "1 point would be the noise itself"),
    DPMPP_2M: (1, "one step goes from the first flow sigma to 0"),
    UNIPC: (1, "one step goes from the first flow sigma to 0"),
}
STATE_FLOAT64 = frozenset({EULER, HEUN, EULER_MARUYAMA})  # REPA's samplers keep x in float64

SDE_LAST_T = 0.04  # SiT's last_step_size / REPA's linspace(1, 0.04, N): the final mean step starts here
DOPRI5_ATOL, DOPRI5_RTOL = 1e-6, 1e-3  # SiT's ODE defaults
ODE_PROGRESS = (0.0, 1.0)  # dopri5 integrates s = 1 - t (SiT's own time) from 0 to 1
FLOW_TRAIN_TIMESTEPS = 1000  # diffusers' flow sigmas: linspace(1, 1/1000, ...) (its num_train_timesteps)
FLOW_SHIFT = 1.0  # no timestep shift (SiT and REPA sample uniformly in t)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    DPMPP_2M: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    UNIPC: ("UniPCMultistepScheduler", {"solver_order": 2}),
}


def samplers_for(family: str) -> tuple[str, ...]:
    """The sampler names that apply to a model family (dit: the DDPM samplers; sit, repa: the flow ones)."""
    if family not in SAMPLERS_BY_FAMILY:
        raise DiffusionError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    return SAMPLERS_BY_FAMILY[family]


def check_sampler(name: str, family: str) -> None:
    """One line when sampler ``name`` does not apply to ``family``, naming the ones that do."""
    allowed = samplers_for(family)
    if name not in allowed:
        kind = "a flow-matching" if family in FLOW_FAMILIES else "a diffusion (DDPM)"
        raise DiffusionError(f"sampler {name!r} does not apply to {kind} model (family {family}); "
                             f"use one of {', '.join(allowed)}")


def check_flow_steps(name: str, steps: int) -> None:
    """One line when ``steps`` is below flow sampler ``name``'s minimum (MIN_STEPS says why)."""
    least, why = MIN_STEPS[name]
    if steps < least:
        raise DiffusionError(f"{name} needs at least {least} sampling steps, got {steps}: {why}")


def network_time(family: str, t: float) -> float:
    """The t a ``family`` network is called with at the user's time t (1 = noise)."""
    return 1.0 - t if family == FAMILY_SIT else t


def velocity_from_network(family: str, out: Tensor) -> Tensor:
    """The user-convention velocity (noise - x) from a ``family`` network's output."""
    return -out if family == FAMILY_SIT else out


def _check_family(family: str) -> None:
    if family not in FLOW_FAMILIES:
        raise DiffusionError(f"flow samplers take a flow family ({', '.join(FLOW_FAMILIES)}), not {family!r}")


class _Velocity:
    """v(x, t) in the user's convention from a network function, counting the calls.

    The model function of a step is picked on the host at the user's t (``for_timestep``: the guidance
    interval), then called with the network's t; its output is cast to the state's dtype.
    """

    def __init__(self, model_fn: ModelFn, family: str, model_kwargs: dict, x_T: Tensor) -> None:
        self.model_fn, self.family, self.kwargs = model_fn, family, model_kwargs
        self.model_dtype, self.batch, self.channels = x_T.dtype, x_T.shape[0], x_T.shape[1]
        self.calls = 0

    def function_at(self, t: float) -> ModelFn:
        """The model function for a step at the user's time t (guided or not)."""
        return model_for_timestep(self.model_fn, t)

    def __call__(self, fn: ModelFn, x: Tensor, t: float, t_net: float | None = None) -> Tensor:
        """v [B, C, ...] in x's dtype at user time t (network time ``t_net`` when given: dopri5's own clock)."""
        t_net = network_time(self.family, t) if t_net is None else t_net
        t_in = torch.full((self.batch,), t_net, dtype=torch.float32, device=x.device)
        out = fn(x.to(self.model_dtype), t_in, **self.kwargs)
        self.calls += 1
        if out.shape[1] != self.channels:
            raise DiffusionError(
                f"flow model output has {out.shape[1]} channels, expected {self.channels} (the velocity only; "
                "a learned-sigma network must return its first half, as models.sit.SiT does)"
            )
        return velocity_from_network(self.family, out.to(x.dtype))


class FlowSampler:
    """Flow sampler ``name`` with ``steps`` steps for a ``family`` network (sit or repa).

    Call it with (model_fn, x_T, noise=..., model_kwargs=...). ``nfe``: model calls per image (None for
    dopri5 before a call; ``last_nfe`` after). One call at a time (the diffusers schedulers keep state).
    """

    def __init__(
        self,
        name: str,
        steps: int,
        *,
        family: str = FAMILY_SIT,
        atol: float = DOPRI5_ATOL,
        rtol: float = DOPRI5_RTOL,
    ) -> None:
        if name not in FLOW_SAMPLER_NAMES:
            raise DiffusionError(f"unknown flow sampler {name!r}; choose from {', '.join(FLOW_SAMPLER_NAMES)}")
        _check_family(family)
        check_flow_steps(name, steps)
        self.name, self.steps, self.family = name, steps, family
        self.atol, self.rtol = atol, rtol
        self.last_nfe: int | None = None
        self.scheduler = self._make_scheduler() if name in SCHEDULERS else None

    @property
    def nfe(self) -> int | None:
        """Model evaluations per image (a guided evaluation is one call over the doubled batch)."""
        if self.name == HEUN:
            return 2 * self.steps - 1
        if self.name == DOPRI5:
            return self.last_nfe
        return self.steps

    def times(self) -> list[float]:
        """The user's t of every model call, in order (not for dopri5, whose times are adaptive)."""
        if self.name in (EULER, HEUN):
            grid = _linspace(1.0, 0.0, self.steps + 1)
            if self.name == EULER:
                return grid[:-1]
            calls = [grid[0]]
            for i in range(1, self.steps):
                calls += [grid[i], grid[i]]  # the corrector at t_next, then the next predictor there
            return calls
        if self.name == EULER_MARUYAMA:
            return _linspace(1.0, SDE_LAST_T, self.steps)
        if self.scheduler is not None:
            self.scheduler.set_timesteps(self.steps)
            return [float(s) for s in self.scheduler.sigmas[: self.steps]]
        raise DiffusionError(f"{self.name} chooses its times during the solve")

    def describe(self) -> dict[str, Any]:
        """What a manifest records: sampler, steps, NFE, the time convention and the solver's settings."""
        out: dict[str, Any] = {"sampler": self.name, "steps": self.steps, "nfe": self.nfe, "family": self.family,
                               "time_convention": TIME_CONVENTION, "network_time": NETWORK_TIME[self.family]}
        if self.name == DOPRI5:
            out["solver"] = {"method": "dopri5 (torchdiffeq)", "atol": self.atol, "rtol": self.rtol,
                             "integrates": "s = 1 - t from 0 to 1", "dtype": "x_T's",
                             "batch_dependent": "adaptive steps are chosen for the whole batch: a sample's "
                                                "image depends on the batch it is drawn in"}
        else:
            out["times"] = self.times()
            out["state_dtype"] = "float64" if self.name in STATE_FLOAT64 else "x_T's"
        if self.name == EULER_MARUYAMA:
            out["sde"] = {"diffusion": "w_t = t (SiT's 'sigma' form)", "last_step": f"mean, {SDE_LAST_T} -> 0",
                          "stochastic_steps": self.steps - 1}
        if self.scheduler is not None:
            class_name, settings = SCHEDULERS[self.name]
            out["scheduler"] = {"class": class_name, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                "flow_shift": FLOW_SHIFT, "num_train_timesteps": FLOW_TRAIN_TIMESTEPS, **settings}
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
        """x_0 [B, C, ...] in x_T's dtype from x_T ~ N(0, I). ``noise``: SampleNoise or noise_fn (euler-maruyama).

        ``clip_denoised`` is accepted for the common call shape and unused: SiT and REPA do not clip.
        """
        velocity = _Velocity(model_fn, self.family, model_kwargs or {}, x_T)
        with torch.no_grad():
            if self.name in (EULER, HEUN):
                x = self._euler(velocity, x_T, progress)
            elif self.name == EULER_MARUYAMA:
                x = self._euler_maruyama(velocity, x_T, noise, progress)
            elif self.name == DOPRI5:
                x = self._dopri5(velocity, x_T)
            else:
                x = self._multistep(velocity, x_T, progress)
        self.last_nfe = velocity.calls
        return x.to(x_T.dtype)

    # ------------------------------------------------------------------------------------------ solvers

    def _euler(self, velocity: _Velocity, x_T: Tensor, progress: bool) -> Tensor:
        """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i); heun: the trapezoid of v at both ends, but on the last step."""
        grid = _linspace(1.0, 0.0, self.steps + 1)
        x = x_T.to(torch.float64)
        for i in tqdm(range(self.steps), disable=not progress):
            t_cur, t_next = grid[i], grid[i + 1]
            fn = velocity.function_at(t_cur)  # REPA decides guidance by t_cur for both evaluations of a step
            d_cur = velocity(fn, x, t_cur)
            x_next = x + (t_next - t_cur) * d_cur
            if self.name == HEUN and i < self.steps - 1:
                d_next = velocity(fn, x_next, t_next)
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
            x = x_next
        return x

    def _euler_maruyama(self, velocity: _Velocity, x_T: Tensor, noise: Any, progress: bool) -> Tensor:
        """The reverse SDE dx = (v - t s) dt + sqrt(2 t) dW from t=1 to 0.04, then the mean step to 0."""
        grid = _linspace(1.0, SDE_LAST_T, self.steps) + [0.0]
        draws = open_noise(noise, x_T, self.steps - 1)  # float32 draws shaped like x_T, one per stochastic step
        x = x_T.to(torch.float64)
        try:
            for i in tqdm(range(self.steps), disable=not progress):
                t_cur, t_next = grid[i], grid[i + 1]
                dt = t_next - t_cur
                v = velocity(velocity.function_at(t_cur), x, t_cur)
                score = -(x + (1.0 - t_cur) * v) / t_cur  # noise = x + (1 - t) v, score = -noise / t
                drift = v - t_cur * score  # v - g^2 s / 2 with g^2 = 2 w_t = 2 t
                if i < self.steps - 1:
                    eps = next(draws).to(torch.float64)  # type: ignore[arg-type]
                    x = x + drift * dt + math.sqrt(2.0 * t_cur) * (eps * math.sqrt(abs(dt)))
                else:
                    x = x + drift * dt  # the mean step: no noise
        finally:
            if draws is not None:
                draws.close()
        return x

    def _dopri5(self, velocity: _Velocity, x_T: Tensor) -> Tensor:
        """dx/ds = -v(x, 1 - s) from s=0 to 1 (SiT's own direction), adaptive Dormand-Prince."""
        try:
            from torchdiffeq import odeint
        except ImportError:
            raise DiffusionError("sampler dopri5 needs the torchdiffeq package (pip install torchdiffeq)") from None
        fn_cache: dict[float, ModelFn] = {}

        def rhs(s: Tensor, x: Tensor) -> Tensor:
            s_host = float(s)  # an adaptive solver reads its step sizes on the host anyway
            t = 1.0 - s_host
            fn = fn_cache.setdefault(t, velocity.function_at(t))
            t_net = s_host if self.family == FAMILY_SIT else t  # SiT's network runs on s itself
            return -velocity(fn, x, t, t_net=t_net)

        s = torch.tensor(ODE_PROGRESS, dtype=x_T.dtype, device=x_T.device)
        return odeint(rhs, x_T, s, method="dopri5", atol=self.atol, rtol=self.rtol)[-1]

    def _make_scheduler(self) -> Any:
        import diffusers  # the library takes seconds to import; only these samplers need it

        class_name, settings = SCHEDULERS[self.name]
        return getattr(diffusers, class_name)(
            num_train_timesteps=FLOW_TRAIN_TIMESTEPS, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=FLOW_SHIFT, **settings,
        )

    def _multistep(self, velocity: _Velocity, x_T: Tensor, progress: bool) -> Tensor:
        """diffusers' multistep solver on flow sigmas: sigma = t, the flow prediction is v (noise - x)."""
        scheduler = self.scheduler
        sigmas = self.times()  # set_timesteps: a fresh solver state for this batch
        x = x_T
        for i in tqdm(range(self.steps), disable=not progress):
            v = velocity(velocity.function_at(sigmas[i]), x, sigmas[i])
            x = scheduler.step(v, scheduler.timesteps[i], x).prev_sample
        return x


def _linspace(start: float, end: float, count: int) -> list[float]:
    """torch.linspace in float64 as host floats (REPA's grids, bit for bit)."""
    return torch.linspace(start, end, count, dtype=torch.float64).tolist()

