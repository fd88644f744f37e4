"""ADM Gaussian diffusion with DiT's defaults: schedules, respacing, samplers, losses, guidance.

The flow-matching samplers and objective of SiT and REPA live in ``diffusion.flow`` and
``diffusion.flow_loss`` (imported from there: they build on ``diffusion.samplers``, which imports this package).
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusion.gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from diffusion.guidance import guided_model
from diffusion.losses import LossWeighting
from diffusion.respace import SpacedDiffusion, space_timesteps
from diffusion.schedules import DiffusionError, get_named_beta_schedule

__all__ = [
    "DiffusionError",
    "GaussianDiffusion",
    "LossType",
    "LossWeighting",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "create_diffusion",
    "guided_model",
    "space_timesteps",
]

DEFAULT_DIFFUSION_STEPS = 1000


def create_diffusion(
    timestep_respacing: str | int | Sequence[int] | None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = DEFAULT_DIFFUSION_STEPS,
    predict_v: bool = False,
) -> SpacedDiffusion:
    """DiT's diffusion factory. timestep_respacing None or "" keeps all steps ("250", "ddim50", "10,20,30").

    Loss: RESCALED_KL if use_kl, else RESCALED_MSE if rescale_learned_sigmas, else MSE.
    Variance: LEARNED_RANGE if learn_sigma, else FIXED_SMALL if sigma_small, else FIXED_LARGE.
    Mean: START_X if predict_xstart, VELOCITY if predict_v, else EPSILON.
    """
    if predict_xstart and predict_v:
        raise DiffusionError("predict_xstart and predict_v are mutually exclusive")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if predict_xstart:
        mean_type = ModelMeanType.START_X
    elif predict_v:
        mean_type = ModelMeanType.VELOCITY
    else:
        mean_type = ModelMeanType.EPSILON
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
    )
