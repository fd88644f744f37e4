"""Sample a class-conditional DiT on any number of processes and pack an ADM `.npz` for FID.

    torchrun --nproc_per_node=8 sample_ddp.py --cfg-scale 1.5
    python sample_ddp.py --model DiT-S/2 --ckpt my.pt --image-size 32 --vae none --num-fid-samples 100

Sample i's class label, initial noise and every step's noise come from its own generator,
seeded with global_seed * 2**32 + i, so the images do not depend on the number of processes,
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launch.exits import EXIT_BAD_INPUT
from launch.files import file_sha256, remove_stale_temps, write_json_atomic
from models.vae import CODEC_CHOICES

SAMPLERS = ("ddpm", "ddim")
GUIDANCE_CHANNELS = ("first3", "all")
PRECISIONS = ("fp32", "bf16")
OFFICIAL_MODEL = "DiT-XL/2"
CUSTOM_MODEL = "custom"
OFFICIAL_SIZES = (256, 512)
OFFICIAL_NUM_CLASSES = 1000
GRID_SIZE = 64
SD_VAE_DOWNSAMPLE = 8  # sd-vae-ft latents are 1/8 of the image (a --vae-path VAE is checked when loaded)
VERSIONED_PACKAGES = ("torch", "diffusers", "timm", "numpy", "pillow", "torch-fidelity")

EXAMPLES = """examples:
  torchrun --nproc_per_node=8 sample_ddp.py --cfg-scale 1.5
  torchrun --standalone --nproc_per_node=2 sample_ddp.py --model DiT-S/2 --ckpt run/0100000.pt \\
      --image-size 32 --vae none --num-classes 10 --num-fid-samples 1000 --label-sampling balanced
"""


class ConfigError(Exception):
    """A bad command-line value; the message is one line."""


@dataclass(frozen=True)
class SampleConfig:
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
    dist_timeout: float = 600.0
    overwrite: bool = False
    pack_only: bool = False
    no_npz: bool = False
    png_workers: int = 4

    @property
    def run_name(self) -> str:
        from launch.rundir import run_name

        return run_name(self.model, self.ckpt, self.image_size, self.vae, self.cfg_scale, self.global_seed,
                        self.sampler, self.num_sampling_steps)

    @property
    def run_dir(self) -> Path:
        return Path(self.sample_dir) / self.run_name

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
        }


def build_parser() -> argparse.ArgumentParser:
    from models.dit import DiT_models

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=36))
    add = p.add_argument
    add("--model", choices=[*DiT_models, CUSTOM_MODEL], default=OFFICIAL_MODEL,
        help=f"DiT configuration; {CUSTOM_MODEL}: the architecture stored in a train.py checkpoint")
    add("--vae", choices=CODEC_CHOICES, default="ema", help="sd-vae-ft decoder; none for pixel-space models")
    add("--vae-path", default=None, help="local diffusers AutoencoderKL folder (instead of the hub)")
    add("--sample-dir", default="samples", help="parent folder of the run folder and the .npz")
    add("--per-proc-batch-size", type=int, default=32, help="images per process per forward pass")
    add("--num-fid-samples", type=int, default=50_000, help="exactly this many images in total")
    add("--image-size", type=int, default=256, help="image side in pixels")
    add("--num-classes", type=int, default=OFFICIAL_NUM_CLASSES, help="classes; the null label is this index")
    add("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    add("--num-sampling-steps", type=int, default=250, help="sampler steps (respaced from 1000)")
    add("--global-seed", type=int, default=0, help="seed of sample i is global_seed * 2**32 + i")
    add("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on Ampere+ GPUs")
    add("--ckpt", default=None, help="DiT checkpoint (.pt/.safetensors); default: official DiT-XL/2 download")
    add("--allow-pickle", action="store_true", help="load checkpoints that need full unpickling (trusted only)")
    add("--sampler", choices=SAMPLERS, default="ddpm", help="ancestral DDPM or deterministic DDIM")
    add("--ddim-eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    add("--guidance-channels", choices=GUIDANCE_CHANNELS, default="first3",
        help="first3 reproduces the DiT paper; all is the standard form")
    add("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
        help="apply guidance only for training timesteps LOW <= t <= HIGH")
    add("--label-sampling", choices=("random", "balanced"), default="random",
        help="balanced: every class N/C times (as even as possible)")
    add("--precision", choices=PRECISIONS, default="fp32", help="bf16 autocast for the model")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--dist-timeout", type=float, default=600.0, help="seconds before a hung collective ends the job")
    add("--overwrite", action="store_true", help="replace a run folder made with another configuration")
    add("--pack-only", action="store_true", help="only pack an existing run folder into the .npz")
    add("--no-npz", action="store_true", help="write PNGs only, no .npz")
    add("--png-workers", type=int, default=4, help="background PNG encoding threads per process")
    return p


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = tuple(values["guidance_interval"])
    cfg = SampleConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: SampleConfig) -> None:
    """Every check that needs no file or model: one line per problem, before any work."""
    from diffusion.rng import MAX_GLOBAL_SEED
    from models.dit import DiT_models

    if cfg.model not in DiT_models and cfg.model != CUSTOM_MODEL:
        raise ConfigError(f"unknown --model {cfg.model!r}; choose one of {', '.join(DiT_models)} or {CUSTOM_MODEL}")
    if cfg.cfg_scale < 1.0:
        raise ConfigError(f"--cfg-scale must be >= 1 (1 disables guidance), got {cfg.cfg_scale}")
    if cfg.num_fid_samples <= 0:
        raise ConfigError(f"--num-fid-samples must be positive, got {cfg.num_fid_samples}")
    if cfg.per_proc_batch_size <= 0:
        raise ConfigError(f"--per-proc-batch-size must be positive, got {cfg.per_proc_batch_size}")
    if cfg.num_classes <= 0:
        raise ConfigError(f"--num-classes must be positive, got {cfg.num_classes}")
    if cfg.num_sampling_steps <= 0:
        raise ConfigError(f"--num-sampling-steps must be positive, got {cfg.num_sampling_steps}")
    if not 0 <= cfg.global_seed <= MAX_GLOBAL_SEED:
        raise ConfigError(f"--global-seed must be in [0, {MAX_GLOBAL_SEED}], got {cfg.global_seed}")
    if cfg.png_workers <= 0:
        raise ConfigError(f"--png-workers must be positive, got {cfg.png_workers}")
    if cfg.dist_timeout <= 0:
        raise ConfigError(f"--dist-timeout must be positive, got {cfg.dist_timeout}")
    if cfg.ddim_eta < 0:
        raise ConfigError(f"--ddim-eta must be >= 0, got {cfg.ddim_eta}")
    if cfg.guidance_interval is not None and cfg.guidance_interval[0] > cfg.guidance_interval[1]:
        raise ConfigError(f"--guidance-interval LOW HIGH needs LOW <= HIGH, got {cfg.guidance_interval}")
    downsample = 1 if cfg.vae == "none" else SD_VAE_DOWNSAMPLE
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
        if cfg.vae == "none":
            raise ConfigError("the official DiT-XL/2 is a latent model; use --vae ema or mse")
    if cfg.ckpt is not None and not cfg.pack_only and not Path(cfg.ckpt).is_file():
        raise ConfigError(f"--ckpt {cfg.ckpt} does not exist")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _autocast(cfg: SampleConfig, device):  # noqa: ANN001, ANN202
    import torch

    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_network(cfg: SampleConfig, device):  # noqa: ANN001, ANN201
    """Model and codec on `device`; rank 0 downloads first, the others then read the cache."""
    from launch import dist
    from models.checkpoints import build_model, official_checkpoint
    from models.vae import load_codec

    ckpt = cfg.ckpt or str(dist.rank0_first(lambda: official_checkpoint(cfg.image_size)))
    codec = dist.rank0_first(lambda: load_codec(cfg.vae, cfg.vae_path, device=device))
    if cfg.image_size % codec.downsample:
        raise ConfigError(f"--image-size {cfg.image_size} is not a multiple of the VAE's factor {codec.downsample}")
    model, meta = build_model(cfg.model, ckpt, cfg.image_size // codec.downsample, cfg.num_classes,
                              allow_pickle=cfg.allow_pickle)
    if cfg.vae == "none":
        codec = load_codec("none", device=device, image_channels=model.in_channels)
    if model.in_channels != codec.latent_channels:
        raise ConfigError(f"checkpoint {ckpt} has {model.in_channels} input channels but --vae {cfg.vae} gives "
                          f"{codec.latent_channels}; use --vae none for pixel-space models")
    model = model.to(device).eval().requires_grad_(False)
    if cfg.compile:
        model = _compiled(model, cfg, device)
    return model, codec, ckpt, meta


def _compiled(model, cfg: SampleConfig, device):  # noqa: ANN001, ANN202
    """torch.compile(model), tried once on the real batch shape; the eager model if compiling fails."""
    import torch

    from launch import dist

    compiled = torch.compile(model)
    batch = cfg.per_proc_batch_size * (2 if cfg.cfg_scale > 1 else 1)
    x = torch.zeros(batch, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    try:
        with _autocast(cfg, device):
            compiled(x, t, t)
    except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler on the node: sampling still works eagerly
        dist.print0(f"warning: --compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                    "sampling without it")
        return model
    return compiled


def _dist_setup(cfg: SampleConfig):  # noqa: ANN202
    import torch

    from launch import dist, preempt

    info = dist.init(cfg.dist_timeout)
    dist.install_fail_fast()
    preempt.install()
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.set_grad_enabled(False)
    return info


def run(cfg: SampleConfig) -> int:
    """Sample every missing image of the run, then pack the `.npz` on rank 0. Returns an exit code."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from diffusion import create_diffusion
    from diffusion.guidance import guided_model
    from diffusion.rng import SampleNoise, sample_seed
    from evaluation.batches import PngWriter, index_filename, png_is_valid
    from launch import dist, preempt, rundir, shard

    info = _dist_setup(cfg)
    if cfg.pack_only:
        return pack(cfg) if info.is_main else 0

    N = cfg.num_fid_samples
    ckpt_sha = dist.main_only(lambda: file_sha256(Path(cfg.ckpt)) if cfg.ckpt else None)
    identity = cfg.identity(ckpt_sha)
    labels = shard.plan_labels(N, cfg.num_classes, cfg.global_seed, cfg.label_sampling, sample_seed)

    def prepare_folder() -> dict:
        previous = rundir.prepare(cfg.run_dir, identity, cfg.overwrite)
        remove_stale_temps(cfg.run_dir)
        manifest = previous or {"version": rundir.MANIFEST_VERSION, "identity": identity,
                                "config": dataclasses.asdict(cfg), "seed_formula": "seed_i = global_seed * 2**32 + i",
                                "label_rule": shard.plan_labels.__doc__.split("\n\n")[1].strip(),
                                "labels": labels.tolist(), "sessions": []}
        manifest["versions"] = package_versions()
        manifest["sessions"].append({"started": rundir.now(), "world_size": info.world_size,
                                     "per_proc_batch_size": cfg.per_proc_batch_size, "device": info.device.type})
        write_json_atomic(cfg.run_dir / rundir.MANIFEST_NAME, manifest)
        return manifest

    model, codec, _, meta = load_network(cfg, info.device)  # validates the checkpoint before any file is written
    _check_class_map(meta, cfg)
    dist.main_only(prepare_folder)

    filename = lambda i: index_filename(i, N)  # noqa: E731
    local_missing = rundir.scan_missing(cfg.run_dir, N, info.world_size, info.rank, filename, png_is_valid)
    missing = sorted(i for part in dist.all_gather_object(local_missing) for i in part)
    dist.print0(f"{cfg.run_dir}: {N - len(missing)} of {N} images present, {len(missing)} to sample "
                f"on {info.world_size} process(es)")

    diffusion = create_diffusion(str(cfg.num_sampling_steps) if cfg.sampler == "ddpm"
                                 else f"ddim{cfg.num_sampling_steps}", learn_sigma=model.learn_sigma,
                                 **_trained_objective(meta))
    model_fn = guided_model(model, cfg.cfg_scale, cfg.num_classes, cfg.guidance_channels, cfg.guidance_interval)
    latent_shape = (model.in_channels, model.input_size, model.input_size)
    writer = PngWriter(workers=cfg.png_workers)
    bar = tqdm(total=N, initial=N - len(missing), unit="img", disable=not info.is_main, dynamic_ncols=True,
               desc="sampling")
    stopped = False
    try:
        for batch in shard.rank_batches(missing, info.world_size, info.rank, cfg.per_proc_batch_size):
            if batch:
                noise = SampleNoise([sample_seed(cfg.global_seed, i) for i in batch])
                noise.randint(cfg.num_classes)  # the label draw; keeps every stream's layout fixed
                z = noise.randn(latent_shape, info.device)
                y = torch.as_tensor(labels[batch], device=info.device)
                with _autocast(cfg, info.device):
                    x0 = _sample(diffusion, model_fn, z, y, noise, cfg)
                images = codec.decode(x0.float()).numpy()
                for i, image in zip(batch, images):
                    writer.submit(cfg.run_dir / filename(i), image)
            done, stop = dist.all_reduce_counts([len(batch), float(preempt.requested())])
            bar.update(int(done))
            if stop:
                stopped = True
                break
        writer.close()
    finally:
        bar.close()
    if stopped:
        dist.barrier()  # every rank's in-flight PNGs are on disk before any rank exits (torchrun stops the rest)
        dist.print0("preemption signal received: in-flight PNGs written; rerun the same command to resume")
        dist.shutdown()
        return preempt.EXIT_PREEMPTED
    dist.barrier()  # everyone's PNGs are on disk; rank 0 packs alone, with no collective pending
    dist.shutdown()
    if not info.is_main:
        return 0
    _finish_manifest(cfg)
    _write_grid(cfg, np)
    return 0 if cfg.no_npz else pack(cfg)


def _sample(diffusion, model_fn, z, y, noise, cfg: SampleConfig):  # noqa: ANN001, ANN202
    clip = cfg.vae == "none"  # pixel-space x0 lives in [-1, 1]; latents are not clipped (as DiT)
    kwargs = dict(noise=z, clip_denoised=clip, model_kwargs={"y": y}, device=z.device, noise_fn=noise)
    if cfg.sampler == "ddim":
        return diffusion.ddim_sample_loop(model_fn, z.shape, eta=cfg.ddim_eta, **kwargs)
    return diffusion.p_sample_loop(model_fn, z.shape, **kwargs)


def _trained_objective(meta: dict) -> dict:
    """The diffusion a train.py checkpoint was trained with (official checkpoints: DiT's defaults)."""
    from diffusion import DEFAULT_DIFFUSION_STEPS

    config = meta.get("config") or {}
    return {"predict_v": config.get("prediction") == "v",
            "noise_schedule": config.get("noise_schedule", "linear"),
            "diffusion_steps": int(config.get("diffusion_steps", DEFAULT_DIFFUSION_STEPS))}


def _check_class_map(meta: dict, cfg: SampleConfig) -> None:
    class_to_idx = meta.get("class_to_idx")
    if class_to_idx and len(class_to_idx) != cfg.num_classes:
        raise ConfigError(f"checkpoint {cfg.ckpt} was trained on {len(class_to_idx)} classes "
                          f"but --num-classes is {cfg.num_classes}")


def _finish_manifest(cfg: SampleConfig) -> None:
    from launch import rundir

    manifest = rundir.read_manifest(cfg.run_dir) or {}
    if manifest.get("sessions"):
        manifest["sessions"][-1]["finished"] = rundir.now()
    write_json_atomic(cfg.run_dir / rundir.MANIFEST_NAME, manifest)


def _write_grid(cfg: SampleConfig, np) -> None:  # noqa: ANN001
    from PIL import Image

    from evaluation.batches import index_filename
    from launch import rundir

    n = min(GRID_SIZE, cfg.num_fid_samples)
    images = [np.asarray(Image.open(cfg.run_dir / index_filename(i, cfg.num_fid_samples)).convert("RGB"))
              for i in range(n)]
    side = math.ceil(math.sqrt(n))
    rows = math.ceil(n / side)
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, side * w, 3), np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, side)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    Image.fromarray(grid).save(cfg.run_dir / rundir.GRID_NAME)


def pack(cfg: SampleConfig) -> int:
    """Stream the run folder's PNGs into `<run>.npz` (arr_0 images, arr_1 labels); rank 0 only."""
    import numpy as np

    from evaluation.batches import pack_folder
    from launch import rundir

    manifest = rundir.read_manifest(cfg.run_dir)
    if manifest is None:
        raise ConfigError(f"{cfg.run_dir} has no {rundir.MANIFEST_NAME}; nothing to pack (run the sampler first)")
    n = manifest["identity"]["num_fid_samples"]
    out = Path(f"{cfg.run_dir}.npz")  # the run name holds dots ("cfg-1.5"): no with_suffix
    start = time.time()
    pack_folder(cfg.run_dir, out, n, labels=np.asarray(manifest["labels"], dtype=np.int64),
                workers=max(2, os.cpu_count() or 2))
    print(f"Saved .npz file to {out} [shape=({n}, {cfg.image_size}, {cfg.image_size}, 3)] "
          f"in {time.time() - start:.1f}s", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from evaluation.batches import BatchError
    from launch import dist
    from launch.rundir import RunDirError
    from models.checkpoints import CheckpointError
    from models.vae import CodecError

    try:
        cfg = config_from_args(args)
        return run(cfg)
    except (ConfigError, CheckpointError, CodecError, RunDirError, BatchError) as exc:
        # Configuration errors are the same on every rank: rank 0 says it once. A write error
        # (e.g. disk full) is this rank's own: it says it, with its rank.
        if dist.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        elif isinstance(exc, BatchError):
            print(f"error: [rank {dist.rank()}] {exc}", file=sys.stderr, flush=True)
        # Leave at once: another rank may be waiting in a collective that will never come.
        sys.stdout.flush()
        os._exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
