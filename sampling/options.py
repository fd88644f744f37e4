"""The sampler's command-line flags, shared by sample_ddp.py, launch.pipeline and launch.sweep (which build their
parsers from `build_parser`), and the configuration they turn into after every check that needs no model.

Settings a preset or the model's family decides (the model, size, sampler, steps, guidance, uint8 conversion,
sample count, reference) have no parser default: `config_from_args` fills what the command line left open
from `--preset`, then from the family's published protocol (DiT: ddpm 250; SiT and REPA: euler-maruyama 250),
then from SampleConfig's defaults."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path
from typing import Any

from diffusion.flow import EULER_MARUYAMA, FAMILY_DIT, FAMILY_SIT, FLOW_SAMPLER_NAMES
from diffusion.guidance import CHANNEL_MODES
from diffusion.rng import LABEL_SAMPLING, MAX_GLOBAL_SEED
from diffusion.samplers import DDPM, SAMPLER_NAMES
from evaluation.cli import HelpFormatter, add_metric_args
from evaluation.networks import check_weight_files
from evaluation.run_metrics import check_reference, check_run_inputs
from models.checkpoints import CUSTOM_MODEL, PUBLISHED, load_checkpoint, published_for
from models.dit import DiT_models
from models.sit import SiT_models
from models.vae import CODEC_CHOICES, UINT8_RULES
from sampling.config import (
    COMPILE_MODES,
    PRECISIONS,
    SAVE_CHOICES,
    SAVE_NONE,
    ConfigError,
    SampleConfig,
    validate,
)
from sampling.presets import ADM_REFERENCE_URL, PRESETS, presets_help

# The settings a preset sets, or the family's protocol: no parser default (None = "not given").
PRESET_FIELDS = ("model", "image_size", "vae", "num_classes", "sampler", "num_sampling_steps", "cfg_scale",
                 "guidance_channels", "guidance_interval", "to_uint8", "num_fid_samples", "ref")
PROTOCOL = {FAMILY_DIT: (DDPM, 250), FAMILY_SIT: (EULER_MARUYAMA, 250)}  # the published sampler and steps
ALL_SAMPLERS = tuple(dict.fromkeys([*SAMPLER_NAMES, *FLOW_SAMPLER_NAMES]))
METRICS_GROUP = "metrics in the sampling job (with --ref)"


def build_parser(description: str, epilog: str, prog: str | None = None,
                 require_ref: bool = False) -> argparse.ArgumentParser:
    """Every flag of the sampler (the official script's, with its defaults, and ours)."""
    d = SampleConfig()
    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog=f"{epilog}\npresets (--preset NAME; explicit flags override them):\n"
                                       f"{presets_help()}\n",
                                formatter_class=lambda prog: HelpFormatter(prog, max_help_position=36))
    add = p.add_argument
    add("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
        help="a published recipe: model, weights, sampler, steps, guidance, uint8 conversion, N, reference")
    add("--model", choices=[*DiT_models, *SiT_models, CUSTOM_MODEL], default=argparse.SUPPRESS,
        help=f"DiT or SiT configuration (default {d.model}); {CUSTOM_MODEL}: the architecture stored in a "
             "train.py checkpoint")
    add("--vae", choices=CODEC_CHOICES, default=argparse.SUPPRESS,
        help=f"sd-vae-ft decoder (default {d.vae}); none for pixel-space models")
    add("--vae-path", default=d.vae_path, help="local diffusers AutoencoderKL folder (instead of the hub)")
    add("--sample-dir", default=d.sample_dir, help="parent folder of the run folder and the .npz")
    add("--per-proc-batch-size", type=int, default=d.per_proc_batch_size, help="images per process per forward pass")
    add("--num-fid-samples", type=int, default=argparse.SUPPRESS,
        help=f"exactly this many images in total (default {d.num_fid_samples:,})")
    add("--image-size", type=int, default=argparse.SUPPRESS, help=f"image side in pixels (default {d.image_size})")
    add("--num-classes", type=int, default=argparse.SUPPRESS,
        help=f"classes; the null label is this index (default {d.num_classes})")
    add("--cfg-scale", type=float, default=argparse.SUPPRESS,
        help=f"classifier-free guidance scale, 1 = off (default {d.cfg_scale})")
    add("--num-sampling-steps", type=int, default=argparse.SUPPRESS,
        help="sampler steps (default: the family's protocol, 250; DiT's are respaced from 1000)")
    add("--global-seed", type=int, default=d.global_seed,
        help=f"0..{MAX_GLOBAL_SEED}; sample i is seeded with global_seed * 2**21 + i")
    add("--tf32", action=argparse.BooleanOptionalAction, default=d.tf32, help="TF32 matmuls on Ampere+ GPUs")
    add("--ckpt", default=d.ckpt,
        help="DiT, SiT or REPA checkpoint (.pt/.safetensors); default: the published weights of --model "
             "(DiT-XL/2 256/512, SiT-XL/2 256) or of --preset, downloaded once")
    add("--allow-pickle", action="store_true", help="load checkpoints that need full unpickling (trusted only)")
    add("--sampler", choices=ALL_SAMPLERS, default=argparse.SUPPRESS,
        help="DiT: ddpm (ancestral, its protocol, the default), ddim, or diffusers' dpm++2m, dpm++2m-sde, unipc, "
             "euler, heun. SiT/REPA: euler-maruyama (their protocol, the default), euler, heun (REPA's ODE "
             "samplers), dopri5 (SiT's ODE), dpm++2m, unipc (diffusers' on flow sigmas)")
    add("--ddim-eta", type=float, default=d.ddim_eta, help="DDIM eta (0 = deterministic, at most 1)")
    add("--guidance-channels", choices=CHANNEL_MODES, default=argparse.SUPPRESS,
        help="first3 reproduces the DiT and SiT papers (their default); all is the standard form (REPA's default)")
    add("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=argparse.SUPPRESS,
        help="guidance only for LOW <= t <= HIGH: DiT's training timesteps (0..999); for SiT/REPA the flow "
             "time in [0, 1] with 1 = noise (REPA's: 0 0.7 is its --guidance-high 0.7)")
    add("--to-uint8", choices=list(UINT8_RULES), default=argparse.SUPPRESS,
        help="the images' uint8 conversion: dit = clamp(127.5x + 128) (DiT, SiT; the default), repa = "
             "clamp(255(x + 1)/2), half a level darker (REPA's; the default for REPA checkpoints)")
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
    metrics.add_argument("--ref", default=argparse.SUPPRESS,
                         help="reference batch (.npz): each batch goes through Inception as it is made; "
                              "<run>.metrics.json at the end" + (" (required, unless a --preset names one)"
                                                                 if require_ref else ""))
    p.set_defaults(require_ref=require_ref)
    add_metric_args(metrics)
    return p


def config_from_args(args: argparse.Namespace, flags: dict[str, str] | None = None) -> SampleConfig:
    """The configuration, checked (one line naming the flag otherwise), with --ref's header and metrics.

    Settings left open are filled from --preset, then from the model family's protocol, then from
    SampleConfig's defaults; `flags` renames the flags a line names (the sweep's grid flags)."""
    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = tuple(values["guidance_interval"])
    given = {k for k in PRESET_FIELDS if values.get(k) is not None}
    if values.get("preset") is not None:
        _apply_preset(values, given)
    for key in ("guidance_channels", "to_uint8"):  # the family's, settled when the checkpoint is read
        values.setdefault(key, None)
    defaults = SampleConfig()
    for key in ("model", "image_size", "vae", "num_classes", "cfg_scale", "num_fid_samples"):
        if values.get(key) is None:
            values[key] = getattr(defaults, key)
    if values.get("ckpt") is None and values.get("published") is None:
        item = published_for(values["model"], values["image_size"])
        values["published"] = item.name if item is not None else None
    values["family"] = model_family(values)
    sampler, steps = PROTOCOL[FAMILY_DIT if values["family"] == FAMILY_DIT else FAMILY_SIT]
    values["sampler"] = values.get("sampler") or sampler
    values["num_sampling_steps"] = values.get("num_sampling_steps") or steps
    if getattr(args, "require_ref", False) and values.get("ref") is None:
        raise ConfigError("--ref REF.npz is required: the metrics are computed against it")
    cfg = SampleConfig(**values)
    validate(cfg, flags)
    check_evaluation(cfg)
    return cfg


def _apply_preset(values: dict[str, Any], given: set[str]) -> None:
    """Fill the settings the command line left open from the preset; refuse flags that contradict it."""
    preset = PRESETS[values["preset"]]
    settings = preset.settings
    if "model" in given and (values["model"] in SiT_models) != (settings["model"] in SiT_models):
        raise ConfigError(f"--preset {preset.name} samples {settings['model']} (family {preset.family}) but "
                          f"--model is {values['model']}: drop one of the two")
    if values.get("ckpt") is None:
        for key, flag in (("model", "--model"), ("image_size", "--image-size"), ("num_classes", "--num-classes")):
            if key in given and values[key] != settings[key]:
                raise ConfigError(f"--preset {preset.name} samples the published {preset.published} weights, "
                                  f"which are {settings['model']} at {settings['image_size']} px with "
                                  f"{settings['num_classes']} classes; {flag} {values[key]} needs --ckpt")
        values["published"] = preset.published
    values["preset_overrides"] = tuple(sorted(k for k in given if k in settings and values[k] != settings[k]))
    for key, value in settings.items():
        if key not in given:
            values[key] = value
    if "ref" not in given:
        if Path(preset.reference).is_file():
            values["ref"] = preset.reference
        else:
            warnings.warn(f"--preset {preset.name}: its reference batch {preset.reference} is not in the current "
                          f"folder, so no metrics in the job; pass --ref PATH (ADM's file: "
                          f"{ADM_REFERENCE_URL}{preset.reference})", stacklevel=2)


def model_family(values: dict[str, Any]) -> str:
    """The family the settings sample (dit | sit | repa): the published weights', the --model name's, or, for
    --model custom, what the train.py checkpoint records (its config). A SiT name may hold a REPA file: the
    exact family is settled when the network is loaded (sampling.network.settle)."""
    if values.get("ckpt") is None and values.get("published") is not None:
        return PUBLISHED[values["published"]].family
    if values["model"] in SiT_models:
        return FAMILY_SIT
    if values["model"] in DiT_models or values.get("ckpt") is None or not Path(values["ckpt"]).is_file():
        return FAMILY_DIT
    _, meta = load_checkpoint(values["ckpt"], allow_pickle=values.get("allow_pickle", False))
    return meta.get("family", FAMILY_DIT)


def check_evaluation(cfg: SampleConfig) -> None:
    """--ref, --metrics, --bootstrap and --save checked against each other and the run (headers only)."""
    if cfg.ref is None:
        if cfg.bootstrap:
            raise ConfigError("--bootstrap resamples the features of the metrics: pass --ref REF.npz with it")
        if cfg.save == SAVE_NONE and not cfg.pack_only:
            raise ConfigError("--save none keeps only the features and the metrics: pass --ref REF.npz (or use "
                              "--save npz or png)")
        return
    reference, metrics = check_reference(cfg.ref, cfg.metrics, cfg.dinov2_resize)
    check_weight_files(metrics, cfg.inception_weights, cfg.dinov2_weights)
    check_run_inputs(reference, metrics, cfg.run_dir, cfg.num_fid_samples, cfg.image_size, cfg.bootstrap,
                     cfg.dinov2_resize)


def command_line(cfg: SampleConfig, fields: list[str]) -> list[str]:
    """The flags of `build_parser` that give `cfg`'s value of each of `fields` (None values left out), in the
    parser's order: what to append to `sample_ddp.py` to make that configuration again."""
    parser = build_parser("", "")
    wanted = set(fields)
    unknown = wanted - {f.name for f in dataclasses.fields(SampleConfig)}
    if unknown:
        raise ValueError(f"not SampleConfig fields: {', '.join(sorted(unknown))}")
    argv: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse keeps no public list of its actions
        if action.dest not in wanted or not action.option_strings:
            continue
        value = getattr(cfg, action.dest)
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true
            if value:
                argv.append(flag)
        elif value is not None:
            argv += [flag, *(repr(v) if isinstance(v, float) else str(v) for v in
                            (value if isinstance(value, (tuple, list)) else [value]))]
        wanted.discard(action.dest)
    if wanted:
        raise ValueError(f"no sampler flag sets {', '.join(sorted(wanted))}")
    return argv
