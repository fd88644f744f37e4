"""The sampling run's configuration: every option with the official DiT script's defaults, the checks that need
no file or model, and the identity that names and guards a run folder.

`SampleConfig` is the only place a default is written: the parser (sampling.options) reads them from here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion import DiffusionError
from diffusion.flow import FAMILY_DIT, FLOW_FAMILIES, check_flow_steps, samplers_for
from diffusion.guidance import CHANNELS_FIRST3
from diffusion.rng import MAX_GLOBAL_SEED, MAX_SAMPLES_PER_SEED
from diffusion.samplers import DDIM, check_steps
from evaluation.bootstrap import check_bootstrap
from evaluation.dinov2 import DEFAULT_RESIZE
from evaluation.inception import DEFAULT_BATCH_SIZE
from evaluation.metrics import METRICS
from evaluation.reference_cache import DEFAULT_CACHE_DIR
from launch.runtime import dist, rundir
from launch.runtime.checks import check_positive
from launch.runtime.errors import UserError
from models.checkpoints import CUSTOM_MODEL, OFFICIAL_MODEL, PUBLISHED
from models.dit import DiT_models
from models.sit import SiT_models
from models.vae import CODEC_NONE, UINT8_DIT, UINT8_RULES

PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes; reduce-overhead = CUDA graphs
OFFICIAL_SIZES = (256, 512)
OFFICIAL_NUM_CLASSES = 1000
SD_VAE_DOWNSAMPLE = 8  # sd-vae-ft latents are 1/8 of the image (a --vae-path VAE is checked when loaded)
MAX_ETA = 1.0  # DDIM's eta beyond 1 asks for more noise than the step has: sqrt of a negative number
# The seed rule gives each global seed 2**21 indices (2,097,152 images, more than ImageNet); a larger set is
# split over --global-seed values, whose streams never overlap.
MAX_NUM_SAMPLES = MAX_SAMPLES_PER_SEED
SAVE_PNG, SAVE_NPZ, SAVE_NONE = "png", "npz", "none"
SAVE_CHOICES = (SAVE_PNG, SAVE_NPZ, SAVE_NONE)
DEFAULT_BLOCK_IMAGES = 512  # images per image shard and feature block and rank: a SIGKILL loses at most this many


class ConfigError(UserError):
    """A command-line value the sampler cannot use."""


@dataclass(frozen=True)
class SampleConfig:
    """Every option of the sampler, with the official script's defaults (the parser reads them from here)."""

    model: str = OFFICIAL_MODEL
    vae: str = "ema"
    vae_path: str | None = None
    sample_dir: str = "samples"
    per_proc_batch_size: int = 32
    num_fid_samples: int = 50_000
    image_size: int = 256
    num_classes: int = OFFICIAL_NUM_CLASSES
    cfg_scale: float = 1.5
    num_sampling_steps: int = 250
    global_seed: int = 0
    tf32: bool = True
    ckpt: str | None = None
    allow_pickle: bool = False
    sampler: str = "ddpm"
    ddim_eta: float = 0.0
    guidance_channels: str | None = CHANNELS_FIRST3  # None: the family's (settled when the checkpoint is read)
    guidance_interval: tuple[float, float] | None = None
    label_sampling: str = "random"
    precision: str = "fp32"
    compile: bool = False
    compile_mode: str = "default"
    dist_timeout: float = 600.0
    overwrite: bool = False
    pack_only: bool = False
    no_npz: bool = False
    png_workers: int = 4
    save: str = SAVE_PNG
    shard_size: int = DEFAULT_BLOCK_IMAGES
    ref: str | None = None
    metrics: str = ",".join(METRICS)  # evaluation.metrics' short names
    eval_batch_size: int = DEFAULT_BATCH_SIZE
    inception_weights: str | None = None
    no_download: bool = False
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    no_cache: bool = False
    bootstrap: int = 0
    bootstrap_seed: int = 0
    dinov2_weights: str | None = None
    dinov2_resize: str = DEFAULT_RESIZE
    to_uint8: str | None = UINT8_DIT  # models.vae.UINT8_RULES (DiT's and SiT's, or REPA's); None: the family's
    family: str = FAMILY_DIT  # dit | sit | repa: which samplers apply (settled from the checkpoint when read)
    preset: str | None = None  # sampling.presets: the published recipe the settings came from
    published: str | None = None  # models.checkpoints.PUBLISHED: the published weights sampled without --ckpt
    preset_overrides: tuple[str, ...] = ()  # the preset's settings the command line changed

    @property
    def checkpoint_label(self) -> str | None:
        """What names the weights in the run name: --ckpt's file, a flow model's published file, or None (the
        official DiT weights, named "pretrained" as the official script does)."""
        if self.ckpt is not None or self.published is None or PUBLISHED[self.published].family == FAMILY_DIT:
            return self.ckpt
        return PUBLISHED[self.published].file

    @property
    def run_name(self) -> str:
        return rundir.run_name(self.model, self.checkpoint_label, self.image_size, self.vae, self.cfg_scale,
                               self.global_seed, self.sampler, self.num_sampling_steps, self.guidance_interval)

    @property
    def run_dir(self) -> Path:
        return Path(self.sample_dir) / self.run_name

    @property
    def folder(self) -> rundir.RunFolder:
        """The run folder's paths (`<run>/`, `<run>.npz`, `<run>.metrics.json`, ...)."""
        return rundir.RunFolder(self.run_dir)

    @property
    def metrics_path(self) -> Path:
        return self.folder.metrics

    def identity(self, ckpt_sha256: str | None) -> dict[str, Any]:
        """Everything that changes the images: a run folder never mixes two of these."""
        return {
            "model": self.model, "ckpt": os.path.basename(self.ckpt) if self.ckpt else "pretrained",
            "ckpt_sha256": ckpt_sha256, "image_size": self.image_size, "vae": self.vae,
            "num_classes": self.num_classes, "cfg_scale": self.cfg_scale, "global_seed": self.global_seed,
            "sampler": self.sampler, "ddim_eta": self.ddim_eta if self.sampler == DDIM else None,
            "num_sampling_steps": self.num_sampling_steps, "guidance_channels": self.guidance_channels,
            "guidance_interval": list(self.guidance_interval) if self.guidance_interval else None,
            "label_sampling": self.label_sampling, "num_fid_samples": self.num_fid_samples,
            "precision": self.precision,
            **({"save": self.save} if self.save != SAVE_PNG else {}),  # folders of PNGs keep their old identity
            # a flow model's family, its published weights and a non-DiT uint8 rule change the images; DiT runs
            # keep the identity they had before flow models came
            **({"family": self.family, "published": self.published} if self.family != FAMILY_DIT else {}),
            **({"to_uint8": self.to_uint8} if self.to_uint8 != UINT8_DIT else {}),
        }

    def replace(self, **changes: Any) -> SampleConfig:
        return dataclasses.replace(self, **changes)


def _check_counts(cfg: SampleConfig) -> None:
    check_positive({"--num-fid-samples": cfg.num_fid_samples, "--per-proc-batch-size": cfg.per_proc_batch_size,
                    "--num-classes": cfg.num_classes, "--num-sampling-steps": cfg.num_sampling_steps,
                    "--png-workers": cfg.png_workers, "--shard-size": cfg.shard_size,
                    "--eval-batch-size": cfg.eval_batch_size})
    if cfg.num_fid_samples > MAX_NUM_SAMPLES:
        raise ConfigError(f"--num-fid-samples {cfg.num_fid_samples} is more than one run folder holds (at most "
                          f"{MAX_NUM_SAMPLES:,}, the seed rule's indices per seed); split it into runs with "
                          "different --global-seed values")
    if not 0 <= cfg.global_seed <= MAX_GLOBAL_SEED:
        raise ConfigError(f"--global-seed must be in [0, {MAX_GLOBAL_SEED}], got {cfg.global_seed}")


def _check_guidance(cfg: SampleConfig, scale_flag: str, interval_flag: str) -> None:
    """Guidance values: finite, a scale of at least 1, an interval LOW <= HIGH of non-negative timesteps (for a
    flow model: of times in [0, 1], 1 = noise)."""
    if not math.isfinite(cfg.cfg_scale):
        raise ConfigError(f"{scale_flag} must be a finite number, got {cfg.cfg_scale}")
    if cfg.cfg_scale < 1.0:
        raise ConfigError(f"{scale_flag} must be >= 1 (1 disables guidance), got {cfg.cfg_scale}")
    if cfg.guidance_interval is not None:
        low, high = cfg.guidance_interval
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"{interval_flag} LOW HIGH must be finite numbers, got {low:g} {high:g}")
        if low > high:
            raise ConfigError(f"{interval_flag} LOW HIGH needs LOW <= HIGH, got {low:g} {high:g}")
        if low < 0:
            raise ConfigError(f"{interval_flag} LOW HIGH: timesteps are >= 0, got {low:g} {high:g}")
        if cfg.family in FLOW_FAMILIES and high > 1:
            raise ConfigError(f"{interval_flag} LOW HIGH is in the flow time t in [0, 1] (1 = noise, REPA's "
                              f"convention: 0 0.7 is REPA's --guidance-high 0.7), got {low:g} {high:g}")


def _check_sampler(cfg: SampleConfig, steps_flag: str) -> None:
    """The sampler applies to the model's family and takes this many steps; eta in [0, 1]."""
    if not (math.isfinite(cfg.ddim_eta) and 0 <= cfg.ddim_eta <= MAX_ETA):
        raise ConfigError(f"--ddim-eta must be in [0, {MAX_ETA:g}], got {cfg.ddim_eta}")
    allowed = samplers_for(cfg.family)
    if cfg.sampler not in allowed:
        kind = "flow-matching" if cfg.family in FLOW_FAMILIES else "diffusion (DDPM)"
        raise ConfigError(f"--sampler {cfg.sampler} does not apply to {cfg.model}, a {kind} model (family "
                          f"{cfg.family}); use one of {', '.join(allowed)}")
    try:
        (check_flow_steps if cfg.family in FLOW_FAMILIES else check_steps)(cfg.sampler, cfg.num_sampling_steps)
    except DiffusionError as exc:
        raise ConfigError(f"{steps_flag} {cfg.num_sampling_steps}: {exc}") from None


def _check_published(cfg: SampleConfig) -> None:
    """Without --ckpt published weights are downloaded: the other flags must fit them."""
    if cfg.published is None:
        raise ConfigError(f"published weights exist only for {OFFICIAL_MODEL} at 256 or 512 px and SiT-XL/2 at 256 "
                          f"px; pass --ckpt for {cfg.model} at {cfg.image_size} px")
    item = PUBLISHED[cfg.published]
    if (cfg.model, cfg.image_size) != (item.model, item.image_size):
        raise ConfigError(f"the published {item.name} weights are {item.model} at {item.image_size} px, not "
                          f"{cfg.model} at {cfg.image_size} px; pass --ckpt for another model")
    if cfg.num_classes != OFFICIAL_NUM_CLASSES:
        raise ConfigError(f"the published {item.model} has {OFFICIAL_NUM_CLASSES} classes but --num-classes is "
                          f"{cfg.num_classes}; pass --ckpt for another model")
    if cfg.vae == CODEC_NONE:
        raise ConfigError(f"the published {item.model} is a latent model; use --vae ema or mse")


def validate(cfg: SampleConfig, flags: dict[str, str] | None = None) -> None:
    """Every check that needs no file or model: one line per problem, before any work. `flags` renames the flags
    a line names (a sweep's --cfg-scales for --cfg-scale, ...)."""
    flag = {"--cfg-scale": "--cfg-scale", "--guidance-interval": "--guidance-interval",
            "--num-sampling-steps": "--num-sampling-steps", **(flags or {})}
    if cfg.model not in DiT_models and cfg.model not in SiT_models and cfg.model != CUSTOM_MODEL:
        raise ConfigError(f"unknown --model {cfg.model!r}; choose one of {', '.join([*DiT_models, *SiT_models])} "
                          f"or {CUSTOM_MODEL}")
    if cfg.to_uint8 is not None and cfg.to_uint8 not in UINT8_RULES:
        raise ConfigError(f"unknown --to-uint8 {cfg.to_uint8!r}; choose one of {', '.join(UINT8_RULES)}")
    _check_counts(cfg)
    _check_guidance(cfg, flag["--cfg-scale"], flag["--guidance-interval"])
    _check_sampler(cfg, flag["--num-sampling-steps"])
    dist.check_timeout(cfg.dist_timeout, "--dist-timeout")
    check_bootstrap(cfg.bootstrap, cfg.bootstrap_seed)
    downsample = 1 if cfg.vae == CODEC_NONE else SD_VAE_DOWNSAMPLE
    patch = 1 if cfg.model == CUSTOM_MODEL else int(cfg.model.rsplit("/", 1)[1])  # "DiT-XL/2", "SiT-XL/2" -> 2
    if cfg.image_size <= 0 or cfg.image_size % (downsample * patch):
        raise ConfigError(f"--image-size {cfg.image_size} does not fit {cfg.model}: it must be a multiple of "
                          f"{downsample * patch} (VAE factor {downsample} x patch {patch})")
    if cfg.ckpt is None and not cfg.pack_only:
        _check_published(cfg)
    if cfg.ckpt is not None and not cfg.pack_only and not Path(cfg.ckpt).is_file():
        raise ConfigError(f"--ckpt {cfg.ckpt} does not exist")
