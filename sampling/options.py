"""The sampler's command-line flags, shared by sample_ddp.py, launch.pipeline and launch.sweep (which build their
parsers from `build_parser`), and the configuration they turn into after every check that needs no model."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from diffusion.guidance import CHANNEL_MODES
from diffusion.rng import LABEL_SAMPLING, MAX_GLOBAL_SEED
from diffusion.samplers import SAMPLER_NAMES
from evaluation.cli import HelpFormatter, add_metric_args
from evaluation.run_metrics import check_reference, check_run_inputs
from models.checkpoints import CUSTOM_MODEL
from models.dit import DiT_models
from models.vae import CODEC_CHOICES
from sampling.config import (
    COMPILE_MODES,
    PRECISIONS,
    SAVE_CHOICES,
    SAVE_NONE,
    ConfigError,
    SampleConfig,
    validate,
)

METRICS_GROUP = "metrics in the sampling job (with --ref)"


def build_parser(description: str, epilog: str, prog: str | None = None,
                 require_ref: bool = False) -> argparse.ArgumentParser:
    """Every flag of the sampler (the official script's, with its defaults, and ours)."""
    d = SampleConfig()
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=lambda prog: HelpFormatter(prog, max_help_position=36))
    add = p.add_argument
    add("--model", choices=[*DiT_models, CUSTOM_MODEL], default=d.model,
        help=f"DiT configuration; {CUSTOM_MODEL}: the architecture stored in a train.py checkpoint")
    add("--vae", choices=CODEC_CHOICES, default=d.vae, help="sd-vae-ft decoder; none for pixel-space models")
    add("--vae-path", default=d.vae_path, help="local diffusers AutoencoderKL folder (instead of the hub)")
    add("--sample-dir", default=d.sample_dir, help="parent folder of the run folder and the .npz")
    add("--per-proc-batch-size", type=int, default=d.per_proc_batch_size, help="images per process per forward pass")
    add("--num-fid-samples", type=int, default=d.num_fid_samples, help="exactly this many images in total")
    add("--image-size", type=int, default=d.image_size, help="image side in pixels")
    add("--num-classes", type=int, default=d.num_classes, help="classes; the null label is this index")
    add("--cfg-scale", type=float, default=d.cfg_scale, help="classifier-free guidance scale (1 = off)")
    add("--num-sampling-steps", type=int, default=d.num_sampling_steps, help="sampler steps (respaced from 1000)")
    add("--global-seed", type=int, default=d.global_seed,
        help=f"0..{MAX_GLOBAL_SEED}; sample i is seeded with global_seed * 2**21 + i")
    add("--tf32", action=argparse.BooleanOptionalAction, default=d.tf32, help="TF32 matmuls on Ampere+ GPUs")
    add("--ckpt", default=d.ckpt, help="DiT checkpoint (.pt/.safetensors); default: official DiT-XL/2 download")
    add("--allow-pickle", action="store_true", help="load checkpoints that need full unpickling (trusted only)")
    add("--sampler", choices=SAMPLER_NAMES, default=d.sampler,
        help="ddpm (ancestral, the DiT protocol), ddim, or diffusers' dpm++2m, dpm++2m-sde, unipc, euler, heun")
    add("--ddim-eta", type=float, default=d.ddim_eta, help="DDIM eta (0 = deterministic, at most 1)")
    add("--guidance-channels", choices=CHANNEL_MODES, default=d.guidance_channels,
        help="first3 reproduces the DiT paper; all is the standard form")
    add("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=d.guidance_interval,
        help="apply guidance only for training timesteps LOW <= t <= HIGH")
    add("--label-sampling", choices=LABEL_SAMPLING, default=d.label_sampling,
        help="balanced: every class N/C times (as even as possible)")
    add("--precision", choices=PRECISIONS, default=d.precision, help="bf16 autocast for the model")
    add("--compile", action="store_true", help="torch.compile the model (the last batch is padded: one shape)")
    add("--compile-mode", choices=COMPILE_MODES, default=d.compile_mode,
        help="torch.compile mode with --compile; reduce-overhead uses CUDA graphs")
    add("--dist-timeout", type=float, default=d.dist_timeout, help="seconds before a hung collective ends the job")
    add("--overwrite", action="store_true",
        help="replace a run folder made with another configuration (the same configuration always resumes)")
    add("--pack-only", action="store_true", help="only pack an existing run folder into the .npz")
    add("--no-npz", action="store_true", help="write PNGs only, no .npz")
    add("--png-workers", type=int, default=d.png_workers, help="background PNG encoding threads per process")
    add("--save", choices=SAVE_CHOICES, default=d.save,
        help="png: one PNG per image (the official layout); npz: image shards, assembled into <run>.npz at the "
             "end; none: only the features, the metrics and grid.png (needs --ref)")
    add("--shard-size", type=int, default=d.shard_size,
        help="images per image shard and feature block, per process (a SIGKILL loses at most one block)")
    metrics = p.add_argument_group(METRICS_GROUP)
    metrics.add_argument("--ref", required=require_ref, default=d.ref,
                         help="reference batch (.npz): each batch goes through Inception as it is made; "
                              "<run>.metrics.json at the end")
    add_metric_args(metrics)
    return p


def config_from_args(args: argparse.Namespace, flags: dict[str, str] | None = None) -> SampleConfig:
    """The configuration, checked (one line naming the flag otherwise), with --ref's header and metrics."""
    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = tuple(values["guidance_interval"])
    cfg = SampleConfig(**values)
    validate(cfg, flags)
    check_evaluation(cfg)
    return cfg


def check_evaluation(cfg: SampleConfig) -> None:
    """--ref, --metrics, --bootstrap and --save checked against each other and the run (headers only)."""
    if cfg.ref is None:
        if cfg.bootstrap:
            raise ConfigError("--bootstrap resamples the features of the metrics: pass --ref REF.npz with it")
        if cfg.save == SAVE_NONE and not cfg.pack_only:
            raise ConfigError("--save none keeps only the features and the metrics: pass --ref REF.npz (or use "
                              "--save npz or png)")
        return
    if cfg.inception_weights is not None and not Path(cfg.inception_weights).is_file():
        raise ConfigError(f"--inception-weights {cfg.inception_weights}: no such file")
    reference, metrics = check_reference(cfg.ref, cfg.metrics)
    check_run_inputs(reference, metrics, cfg.run_dir, cfg.num_fid_samples, cfg.image_size, cfg.bootstrap)
