"""Train a class-conditional DiT (DDPM / improved DDPM objectives, classifier-free guidance) with DDP.

    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet/train --model DiT-XL/2 --image-size 256

Runs under torchrun (NCCL on GPUs, gloo on CPU) or as a plain ``python train.py``. Checkpoints in
``<results-dir>/checkpoints/<step>.pt`` load directly in ``sample_ddp.py --ckpt``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.exits import EXIT_BAD_INPUT
from models.training import TrainConfig, TrainError
from models.vae import CODEC_CHOICES

GRID_PER_CLASS = 4  # sample grid: up to GRID_PER_CLASS images of each of the first GRID_MAX_CLASSES classes
GRID_MAX_CLASSES = 16
GRID_SEED = 0  # fixed noise for the grids, so that successive grids show the same samples improving

EXAMPLES = """examples:
  torchrun --nproc_per_node=8 train.py --data-path /data/imagenet/train --model DiT-XL/2 --image-size 256
  torchrun --nproc_per_node=8 train.py --data-path /data/in256 --latent-cache /data/in256-latents.pt
  torchrun --standalone --nproc_per_node=2 train.py --dataset digits --vae none --image-size 32 \\
      --image-channels 1 --model custom --depth 4 --hidden-size 128 --num-heads 4 --patch-size 4 \\
      --no-hflip --prediction v --label-lr-mult 20 --global-batch-size 64 --lr 3e-4 --max-steps 3000
      (the bundled demo model; full command in models/assets/README.md)
  python train.py ... --resume auto      # continue from the newest checkpoint in --results-dir
"""


def build_parser() -> argparse.ArgumentParser:
    from models import training as T

    d = TrainConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=40),
    )
    add = p.add_argument
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=T.DATASETS,
        default=d.dataset,
        help="folder: class subfolders; latents: a --latent-cache file; digits: the offline demo set",
    )
    g.add_argument("--data-path", default=d.data_path, help="image folder (class = subfolder) or latent file")
    g.add_argument("--image-size", type=int, default=d.image_size, help="ADM centre crop to this side")
    g.add_argument(
        "--num-classes", type=int, default=d.num_classes, help="default: the number of classes found"
    )
    g.add_argument(
        "--hflip", action=argparse.BooleanOptionalAction, default=d.hflip, help="random horizontal flips"
    )
    g.add_argument(
        "--image-channels",
        type=int,
        choices=(1, 3),
        default=d.image_channels,
        help="1: train a pixel-space model on the grey (luma) channel",
    )
    g.add_argument("--vae", choices=CODEC_CHOICES, default=d.vae, help="sd-vae-ft latents; none: pixel space")
    g.add_argument("--vae-path", default=d.vae_path, help="local diffusers AutoencoderKL folder")
    g.add_argument(
        "--latent-cache",
        default=d.latent_cache,
        help="encode the images once into this file (made if missing) and train on it",
    )
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers per process")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        choices=[*T.DIT_CONFIGS, T.CUSTOM_MODEL],
        default=d.model,
        help="a DiT configuration, or custom with the four flags below",
    )
    for name in ("depth", "hidden-size", "num-heads", "patch-size"):
        g.add_argument(f"--{name}", type=int, default=None, help="custom model only")
    g.add_argument(
        "--learn-sigma",
        action=argparse.BooleanOptionalAction,
        default=d.learn_sigma,
        help="learned variance with the hybrid loss (MSE + VLB, improved DDPM)",
    )
    g.add_argument(
        "--class-dropout",
        type=float,
        default=d.class_dropout,
        help="probability of the null label (classifier-free guidance training)",
    )
    g = p.add_argument_group("objective")
    g.add_argument("--prediction", choices=T.PREDICTIONS, default=d.prediction, help="network target")
    g.add_argument("--noise-schedule", choices=T.SCHEDULES, default=d.noise_schedule)
    g.add_argument("--diffusion-steps", type=int, default=d.diffusion_steps)
    g.add_argument("--use-kl", action="store_true", help="train on the variational bound only")
    g.add_argument(
        "--timestep-sampler",
        choices=T.TIMESTEP_SAMPLERS,
        default=d.timestep_sampler,
        help="loss-second-moment: importance sampling of t (improved DDPM, for the VLB)",
    )
    g.add_argument("--loss-weighting", choices=T.WEIGHTINGS, default=d.loss_weighting)
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
    g.add_argument(
        "--precision",
        choices=T.PRECISIONS,
        default=d.precision,
        help="auto: bf16 autocast on CUDA, fp32 on CPU",
    )
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    g.add_argument("--ema-warmup", action="store_true", help="decay min(ema_decay, (1+step)/(10+step))")
    g = p.add_argument_group("run")
    g.add_argument("--results-dir", default=d.results_dir, help="checkpoints/, samples/, log.txt go here")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps in total")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    g.add_argument(
        "--checkpoints-total-limit",
        type=int,
        default=d.checkpoints_total_limit,
        help="keep at most this many checkpoints (oldest removed)",
    )
    g.add_argument(
        "--resume", default=d.resume, help="auto: newest checkpoint in --results-dir; none; or a file"
    )
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument(
        "--sample-every", type=int, default=d.sample_every, help="EMA sample grid period (0: none)"
    )
    g.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps of the grids")
    g.add_argument("--sample-cfg", type=float, default=d.sample_cfg, help="guidance scale of the grids")
    g.add_argument("--global-seed", type=int, default=d.global_seed)
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=d.progress,
        help="progress bar (only when stderr is a terminal)",
    )
    g.add_argument("--dist-timeout", type=float, default=d.dist_timeout)
    add("--tf32", action=argparse.BooleanOptionalAction, default=d.tf32, help="TF32 matmuls on Ampere+ GPUs")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from models.training import validate

    values = {k.replace("-", "_"): v for k, v in vars(args).items()}
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------ pieces


def build_dataset(cfg: TrainConfig, device: Any) -> tuple[Any, Any, bool]:
    """(dataset of (x, label), codec or None for pixel space, whether x must still be encoded)."""
    from launch import dist
    from models import data
    from models.vae import load_codec

    codec = None
    if cfg.vae != "none":
        codec = dist.rank0_first(lambda: load_codec(cfg.vae, cfg.vae_path, device=device))
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
        if not cache.exists():
            extra = {"image_size": cfg.image_size, "vae": cfg.vae}
            dist.main_only(
                lambda: data.precompute_latents(dataset, codec, cache, seed=cfg.global_seed, extra=extra)
            )
        latents = data.LatentDataset(cache)
        _check_latent_cache(latents, cfg, expected_len=len(dataset), class_to_idx=dataset.class_to_idx)
        return latents, codec, False
    return dataset, codec, codec is not None


def _check_latent_cache(
    ds: Any, cfg: TrainConfig, expected_len: int | None = None, class_to_idx: dict | None = None
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


def build_networks(cfg: TrainConfig, in_channels: int, input_size: int, num_classes: int):  # noqa: ANN201
    from models.dit import DiT
    from models.training import architecture

    arch = architecture(cfg)
    if input_size % arch["patch_size"]:
        raise TrainError(
            f"model input size {input_size} is not a multiple of the patch size {arch['patch_size']}"
        )
    model = DiT(
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
class TrainData:
    """The training items and what the network sees of them."""

    dataset: Any  # items (x, label) keyed by (index, flip)
    codec: Any  # the VAE codec, or None in pixel space
    encode_online: bool  # x are images that the codec still encodes at every step
    class_to_idx: dict[str, int]
    num_classes: int
    in_channels: int  # network input channels
    input_size: int  # network input side


def prepare_data(cfg: TrainConfig, device: Any) -> TrainData:
    """The dataset (and codec) of ``cfg`` with the network input shape and class count it implies."""
    dataset, codec, encode_online = build_dataset(cfg, device)
    class_to_idx = dict(dataset.class_to_idx)
    num_classes = cfg.num_classes if cfg.num_classes is not None else len(class_to_idx)
    if class_to_idx and len(class_to_idx) != num_classes:
        raise TrainError(f"--num-classes is {num_classes} but the data have {len(class_to_idx)} classes")
    x0, _ = dataset[(0, False)]
    downsample = codec.downsample if encode_online else 1
    in_channels = codec.latent_channels if encode_online else int(x0.shape[0])
    return TrainData(
        dataset, codec, encode_online, class_to_idx, num_classes, in_channels, int(x0.shape[-1]) // downsample
    )


@dataclass
class TrainState:
    """The networks and what trains them, all on the training device; ``step`` optimizer steps done."""

    model: Any
    ema: Any
    opt: Any
    t_sampler: Any
    arch: dict[str, Any]
    config: dict[str, Any]
    step: int = 0


def to_device(module: Any, device: Any) -> Any:
    """Move a network to the training device (done before its optimizer exists: see `build_state`)."""
    return module.to(device)


def build_state(cfg: TrainConfig, data: TrainData, device: Any, resume_path: Path | None) -> TrainState:
    """Networks on ``device`` first, then the optimizer and the resumed state.

    The order matters: `Optimizer.load_state_dict` puts each state tensor (exp_avg, exp_avg_sq) on its
    parameter's device and dtype, so the parameters must already be where they train.
    """
    import torch

    from diffusion.timestep_sampler import create_named_schedule_sampler
    from models import training as T

    T.seed_everything(T.init_seed(cfg.global_seed))  # the same initial weights on every rank and every run
    model, arch = build_networks(cfg, data.in_channels, data.input_size, data.num_classes)
    model = to_device(model, device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(
        T.param_groups(model, cfg.label_lr_mult), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    t_sampler = create_named_schedule_sampler(cfg.timestep_sampler, cfg.diffusion_steps)
    state = TrainState(model, ema, opt, t_sampler, arch, T.checkpoint_config(cfg, arch))
    if resume_path is not None:
        resume(state, resume_path, data.class_to_idx)
    return state


def resume(state: TrainState, path: Path, class_to_idx: dict[str, int]) -> None:
    """Load a train.py checkpoint into ``state`` (networks already on their device)."""
    from launch import dist
    from models import training as T

    ckpt = T.load_training_checkpoint(path)
    T.check_resumable(ckpt["config"], state.config, path)
    if ckpt["class_to_idx"] != class_to_idx:
        raise TrainError(f"--resume {path} was trained on another class map than --data-path")
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.opt.load_state_dict(ckpt["opt"])
    if ckpt.get("timestep_sampler"):  # empty for the uniform sampler: a loss-aware one then starts afresh
        state.t_sampler.load_state_dict(ckpt["timestep_sampler"])
    state.step = int(ckpt["step"])
    dist.print0(f"resumed from {path} at step {state.step}")


class KeyBatches:
    """Endless key batches for DataLoader(batch_sampler=...), starting after ``done`` micro-batches."""

    def __init__(self, plan: Any, done: int) -> None:
        self.plan, self.done = plan, done

    def __iter__(self) -> Iterator[list]:
        return self.plan.batches(self.done)


def make_loader(dataset: Any, plan: Any, done: int, num_workers: int) -> Iterator:
    from torch.utils.data import DataLoader

    if num_workers == 0:
        return iter(DataLoader(dataset, batch_sampler=KeyBatches(plan, done), num_workers=0))
    return iter(
        DataLoader(
            dataset,
            batch_sampler=KeyBatches(plan, done),
            num_workers=num_workers,
            pin_memory=True,
            persistent_workers=False,
        )
    )


def write_grid(ema: Any, diffusion_cfg: TrainConfig, codec: Any, arch: dict, out: Path, device: Any) -> None:
    """DDIM samples of the EMA weights with guidance: GRID_PER_CLASS rows x classes columns, as one PNG."""
    import numpy as np
    import torch
    from PIL import Image

    from diffusion import create_diffusion, guided_model
    from diffusion.rng import SampleNoise, sample_seed
    from models.vae import PixelCodec

    classes = min(arch["num_classes"], GRID_MAX_CLASSES)
    labels = torch.arange(classes).repeat(GRID_PER_CLASS).to(device)  # row r: classes 0..C-1
    noise = SampleNoise([sample_seed(GRID_SEED, i) for i in range(len(labels))])
    sampler = create_diffusion(
        f"ddim{diffusion_cfg.sample_steps}",
        noise_schedule=diffusion_cfg.noise_schedule,
        learn_sigma=arch["learn_sigma"],
        predict_v=diffusion_cfg.prediction == "v",
        diffusion_steps=diffusion_cfg.diffusion_steps,
    )
    scale = diffusion_cfg.sample_cfg if diffusion_cfg.class_dropout > 0 else 1.0
    fn = guided_model(ema, scale, arch["num_classes"], channels="all")
    shape = (len(labels), arch["in_channels"], arch["input_size"], arch["input_size"])
    pixel = codec is None
    z = sampler.ddim_sample_loop(
        fn, shape, clip_denoised=pixel, model_kwargs={"y": labels}, device=device, noise_fn=noise
    )
    images = (PixelCodec(arch["in_channels"]) if pixel else codec).decode(z).numpy()  # [N, H, W, 3] uint8
    n, h, w, _ = images.shape
    grid = (
        images.reshape(GRID_PER_CLASS, classes, h, w, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(GRID_PER_CLASS * h, classes * w, 3)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(grid)).save(out)


# ------------------------------------------------------------------------------------------ the loop


def run(cfg: TrainConfig) -> int:
    """Train until ``cfg.max_steps``; returns the exit code."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from launch import dist
    from models import data
    from models import training as T

    info = dist.init(cfg.dist_timeout)
    device = info.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    batch = T.per_process_batch(cfg, info.world_size)
    results = Path(cfg.results_dir)

    data_ = prepare_data(cfg, device)
    dataset, codec, encode_online, class_to_idx = data_.dataset, data_.codec, data_.encode_online, data_.class_to_idx
    num_classes = data_.num_classes
    diffusion = T.build_diffusion(cfg)
    state = build_state(cfg, data_, device, _resume_path(cfg, results))
    model, ema, opt, t_sampler, arch, config, step = (
        state.model, state.ema, state.opt, state.t_sampler, state.arch, state.config, state.step
    )
    if info.world_size > 1:
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = model

    plan = data.EpochPlan(len(dataset), batch, info.rank, info.world_size, cfg.global_seed, cfg.hflip)
    loader = make_loader(dataset, plan, step * cfg.grad_accum, cfg.num_workers)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if use_bf16
        else contextlib.nullcontext
    )
    loss_aware = cfg.timestep_sampler != "uniform"

    if info.is_main:
        results.mkdir(parents=True, exist_ok=True)
        (results / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    dist.print0(
        f"{info.world_size} process(es) on {device.type}; {len(dataset)} items, {num_classes} classes; "
        f"model {cfg.model} {arch} ({n_params / 1e6:.2f}M parameters); per-process batch {batch} "
        f"x {cfg.grad_accum} accumulation = {cfg.global_batch_size}; steps {step} -> {cfg.max_steps}"
    )
    bar = _progress_bar(cfg, step, info.is_main)
    log_sum, log_count, log_start, log_step = 0.0, 0, time.perf_counter(), step
    run_start = time.perf_counter()

    while step < cfg.max_steps:
        lr = T.learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.lr_decay_every, cfg.lr_decay_factor)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        opt.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            x, y = next(loader)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            T.seed_everything(
                T.micro_batch_seed(cfg.global_seed, step * cfg.grad_accum + micro, info.rank, info.world_size)
            )
            if encode_online:
                x = codec.encode(x)
            t, weights = t_sampler.sample(x.shape[0], device)
            drop = T.label_drop_mask(x.shape[0], cfg.class_dropout, device)
            sync = micro == cfg.grad_accum - 1 or info.world_size == 1
            with contextlib.nullcontext() if sync else ddp.no_sync(), autocast():
                terms = T.diffusion_loss(
                    diffusion,
                    ddp,
                    x,
                    t,
                    {"y": y, "force_drop_ids": drop},
                    cfg,
                    importance=weights if loss_aware else None,
                )
                loss = terms["loss"].mean() / cfg.grad_accum
            loss.backward()
            if loss_aware:
                gathered = dist.all_gather_object((t.tolist(), terms["raw_loss"].float().tolist()))
                t_sampler.update_with_all_losses(
                    [v for ts, _ in gathered for v in ts], [v for _, ls in gathered for v in ls]
                )
            log_sum += float(terms["loss"].detach().float().mean())
            log_count += 1
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        opt.step()
        T.update_ema(ema, model, T.ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup))
        step += 1
        if bar is not None:
            bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean_loss, count = dist.all_reduce_counts([log_sum, float(log_count)])
            elapsed = time.perf_counter() - log_start
            ips = (step - log_step) * cfg.global_batch_size / max(elapsed, 1e-9)
            line = (
                f"step {step:7d} loss {mean_loss / max(count, 1):.5f} lr {lr:.3e} img/s {ips:8.1f}"
                + (f" grad {grad_norm:.3f}" if grad_norm is not None else "")
                + f" elapsed {T.format_seconds(time.perf_counter() - run_start)}"
            )
            _log(results, line, info.is_main, bar)
            log_sum, log_count, log_start, log_step = 0.0, 0, time.perf_counter(), step
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            if info.is_main:
                payload = {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "config": config,
                    "step": step,
                    "class_to_idx": class_to_idx,
                    "rng": {
                        "global_seed": cfg.global_seed,
                        "rule": "torch.manual_seed(global_seed * 2**32 + micro_batch * world_size + rank)",
                    },
                    "timestep_sampler": t_sampler.state_dict(),
                }
                path = T.save_checkpoint(payload, T.checkpoint_path(results, step))
                removed = T.prune_checkpoints(results, cfg.checkpoints_total_limit)
                _log(
                    results, f"saved {path}" + (f"; removed {len(removed)} old" if removed else ""), True, bar
                )
            dist.barrier()
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps) and info.is_main:
            out = results / "samples" / f"{step:0{T.CHECKPOINT_DIGITS}d}.png"
            with torch.no_grad(), autocast():
                write_grid(ema, cfg, codec, arch, out, device)
            _log(results, f"sample grid {out}", True, bar)
    if bar is not None:
        bar.close()
    dist.print0(f"done: {step} steps in {T.format_seconds(time.perf_counter() - run_start)}")
    dist.barrier()
    dist.shutdown()
    return 0


def _resume_path(cfg: TrainConfig, results: Path) -> Path | None:
    from models import training as T

    if cfg.resume == T.RESUME_NONE:
        return None
    if cfg.resume == T.RESUME_AUTO:
        return T.latest_checkpoint(results)
    path = Path(cfg.resume)
    if not path.is_file():
        raise TrainError(f"--resume {cfg.resume} is not a file (use auto or none)")
    return path


def _progress_bar(cfg: TrainConfig, step: int, main: bool):  # noqa: ANN202
    if not (cfg.progress and main and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True)


def _log(results: Path, line: str, main: bool, bar: Any) -> None:
    if not main:
        return
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
    with open(results / "log.txt", "a") as f:
        f.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    from launch import dist
    from launch.dist import install_fail_fast
    from models.checkpoints import CheckpointError
    from models.data import DataError
    from models.vae import CodecError

    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if dist.world_size() > 1:
            install_fail_fast()
        return run(cfg)
    except (TrainError, DataError, CodecError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
