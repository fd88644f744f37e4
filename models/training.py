"""Training-only pieces: configuration, label dropout, loss assembly, EMA, learning rate, checkpoints.

The loop itself lives in ``train.py``; everything here is a small function of plain values so that it can
be tested against closed forms. Randomness is reseeded at every micro-batch from the key
``(global_seed, micro-batch index * world size + rank)`` (:func:`seed_micro_batch`), so a resumed run draws
exactly the timesteps, noise and dropped labels of an uninterrupted one without storing generator states, and
no two global seeds, micro-batches or ranks share a stream (the whole key seeds the generator, not 32 bits).

Checkpoint format (``torch.load(weights_only=True)`` safe: tensors, dicts, lists, numbers, strings)::

    {"model": state_dict, "ema": state_dict, "opt": AdamW state,
     "config": dict (architecture + args, with "objective" and the model "family" it makes: dit or sit),
     "step": int, "class_to_idx": {name: index}, "rng": {"global_seed", "rule"},
     "timestep_sampler": dict (loss history of the importance sampler; empty when uniform)}
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion import DiffusionError, LossWeighting, create_diffusion
from diffusion.flow import EULER, FAMILY_DIT, FAMILY_SIT, check_sampler
from diffusion.flow_loss import flow_matching_loss, sample_flow_times
from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.guidance import CHANNEL_MODES, CHANNELS_FIRST3
from diffusion.rng import (
    BALANCED_LABELS,
    LABEL_SAMPLING,
    STREAM_TRAIN_INIT,
    STREAM_TRAIN_MICRO_BATCH,
    seed_global_generators,
    stream_key,
)
from diffusion.samplers import DDIM
from launch.runtime.command import run_command
from launch.runtime.errors import EXIT_OK, UserError
from launch.runtime.files import available_cpus, os_reason
from models.data import save_torch
from models.dit import CLASS_DROPOUT_PROB, DIT_CONFIGS
from models.sit import SIT_CONFIGS
from models.vae import CODEC_CHOICES, CODEC_NONE

CUSTOM_MODEL = "custom"
DEFAULT_EMA_DECAY = 0.9999  # DiT
DEFAULT_LR = 1e-4  # DiT (AdamW, no weight decay)
EMA_WARMUP_OFFSET = 10.0  # warm-up decay min(decay, (1 + step) / (10 + step))
CHECKPOINT_DIGITS = 7  # checkpoints/0001000.pt, as DiT
CHECKPOINT_RE = re.compile(r"^(\d+)\.pt$")
CHECKPOINT_KEYS = ("model", "ema", "opt", "config", "step", "class_to_idx", "rng")
OBJECTIVE_DIFFUSION, OBJECTIVE_FLOW = "diffusion", "flow"
OBJECTIVES = (OBJECTIVE_DIFFUSION, OBJECTIVE_FLOW)  # DiT's DDPM objective; SiT's flow matching (family sit)
OBJECTIVE_FAMILY = {OBJECTIVE_DIFFUSION: FAMILY_DIT, OBJECTIVE_FLOW: FAMILY_SIT}
PREDICTIONS = ("epsilon", "v")
SCHEDULES = ("linear", "cosine")
WEIGHTINGS = ("none", "min_snr", "p2")
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")
DATASETS = ("folder", "latents", "digits")
PRECISIONS = ("auto", "fp32", "bf16")
RESUME_AUTO = "auto"
RESUME_NONE = "none"
AUTO_WORKERS_MAX = 8  # image decoding keeps a GPU fed with a few workers; more only cost memory and start-up
# The evaluation during training (train.py --eval-every): a quick number from the EMA weights, sampled and scored
# through the sampling library exactly as sample_ddp.py would score that step's checkpoint.
DEFAULT_EVAL_SAMPLES = 10_000
DEFAULT_EVAL_STEPS = 25  # DDIM-25 (DiT) or Euler-25 (flow): deterministic, 10x cheaper than DDPM-250
EVAL_SAMPLERS = {OBJECTIVE_DIFFUSION: DDIM, OBJECTIVE_FLOW: EULER}  # the default --eval-sampler per objective
DEFAULT_EVAL_BATCH = 32  # images per process per batch (sample_ddp.py's --per-proc-batch-size default)
ARCH_KEYS = (
    "depth",
    "hidden_size",
    "num_heads",
    "patch_size",
    "input_size",
    "in_channels",
    "num_classes",
    "learn_sigma",
)


class TrainError(UserError):
    """A training input is unusable (one-line message naming the flag or file)."""


@dataclass
class TrainConfig:
    """Every training argument (kebab-case flags in train.py map one-to-one onto these fields)."""

    # data
    dataset: str = "folder"
    data_path: str | None = None
    image_size: int = 256
    num_classes: int | None = None  # None: the number of class folders
    hflip: bool = True
    image_channels: int = 3
    vae: str = "ema"
    vae_path: str | None = None
    latent_cache: str | None = None
    num_workers: int | None = None  # None: image_workers() decides
    # model
    model: str = "DiT-XL/2"
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    learn_sigma: bool = True
    class_dropout: float = CLASS_DROPOUT_PROB
    # objective: diffusion (DiT's DDPM losses below) or flow (SiT's velocity matching; the flags below unused)
    objective: str = OBJECTIVE_DIFFUSION
    prediction: str = "epsilon"
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    use_kl: bool = False
    timestep_sampler: str = "uniform"
    loss_weighting: str = "none"
    snr_gamma: float = 5.0
    p2_gamma: float = 1.0
    p2_k: float = 1.0
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    # optimisation
    global_batch_size: int = 256
    grad_accum: int = 1
    lr: float = DEFAULT_LR
    weight_decay: float = 0.0
    label_lr_mult: float = 1.0
    warmup_steps: int = 0
    lr_decay_every: int = 0
    lr_decay_factor: float = 0.5
    max_grad_norm: float = 0.0
    precision: str = "auto"
    ema_decay: float = DEFAULT_EMA_DECAY
    ema_warmup: bool = False
    # run
    results_dir: str = "results"
    max_steps: int = 400_000
    ckpt_every: int = 50_000
    checkpoints_total_limit: int | None = None
    resume: str = RESUME_AUTO
    log_every: int = 100
    sample_every: int = 0
    sample_steps: int = 25
    sample_cfg: float = 4.0
    global_seed: int = 0
    progress: bool = True
    dist_timeout: float = 600.0
    tf32: bool = True
    # evaluation during training (sampling library; None: the sampler's or the evaluator's default)
    eval_every: int = 0  # 0: never
    eval_ref: str | None = None
    eval_samples: int = DEFAULT_EVAL_SAMPLES
    eval_sampler: str | None = None  # None: EVAL_SAMPLERS[objective]
    eval_steps: int = DEFAULT_EVAL_STEPS
    eval_cfg_scale: float = 1.0
    eval_guidance_channels: str = CHANNELS_FIRST3
    eval_label_sampling: str = BALANCED_LABELS
    eval_seed: int = 0
    eval_metrics: str | None = None  # None: the evaluator's default set
    eval_batch_size: int = DEFAULT_EVAL_BATCH
    eval_precision: str = "fp32"
    eval_save: str = "none"
    eval_inception_weights: str | None = None
    eval_cache_dir: str | None = None  # None: the evaluator's reference cache
    eval_dinov2_weights: str | None = None  # with DINOv2 metrics in --eval-metrics; None: the evaluator's lookup

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(cfg: TrainConfig) -> None:
    """Checks that need no file: one TrainError line per problem."""
    choices = {"dataset": DATASETS, "vae": CODEC_CHOICES, "objective": OBJECTIVES, "prediction": PREDICTIONS,
               "noise_schedule": SCHEDULES,
               "loss_weighting": WEIGHTINGS, "timestep_sampler": TIMESTEP_SAMPLERS, "precision": PRECISIONS}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise TrainError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is not one of {', '.join(allowed)}")
    if cfg.image_channels not in (1, 3):
        raise TrainError(f"--image-channels must be 1 or 3, got {cfg.image_channels}")
    if cfg.image_channels != 3 and cfg.vae != CODEC_NONE:
        raise TrainError("--image-channels 1 is for pixel-space models (--vae none); the VAE takes RGB")
    if cfg.dataset != "digits" and not cfg.data_path:
        raise TrainError(f"--dataset {cfg.dataset} needs --data-path")
    if cfg.model == CUSTOM_MODEL:
        missing = [k for k in ("depth", "hidden_size", "num_heads", "patch_size") if getattr(cfg, k) is None]
        if missing:
            raise TrainError(f"--model custom needs {', '.join('--' + k.replace('_', '-') for k in missing)}")
    elif cfg.model not in DIT_CONFIGS and cfg.model not in SIT_CONFIGS:
        raise TrainError(f"--model {cfg.model} is unknown; choose one of {', '.join(DIT_CONFIGS)}, "
                         f"{', '.join(SIT_CONFIGS)} or custom")
    _validate_objective(cfg)
    _validate_evaluation(cfg)
    if not 0.0 <= cfg.class_dropout < 1.0:
        raise TrainError(f"--class-dropout must be in [0, 1), got {cfg.class_dropout}")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise TrainError(f"--ema-decay must be in [0, 1], got {cfg.ema_decay}")
    positive = dict(
        global_batch_size=cfg.global_batch_size,
        grad_accum=cfg.grad_accum,
        max_steps=cfg.max_steps,
        ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every,
        image_size=cfg.image_size,
        sample_steps=cfg.sample_steps,
        diffusion_steps=cfg.diffusion_steps,
    )
    for name, value in positive.items():
        if value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg.label_lr_mult <= 0:
        raise TrainError(f"--label-lr-mult must be > 0, got {cfg.label_lr_mult}")
    if cfg.lr <= 0:
        raise TrainError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise TrainError(f"--checkpoints-total-limit must be >= 1, got {cfg.checkpoints_total_limit}")
    if cfg.use_kl and cfg.loss_weighting != "none":
        raise TrainError("--loss-weighting applies to the MSE objective; it cannot be combined with --use-kl")
    if cfg.use_kl and not cfg.learn_sigma:
        raise TrainError("--use-kl trains the variance through the VLB; it needs --learn-sigma")
    if cfg.noise_offset < 0 or cfg.input_perturbation < 0:
        raise TrainError("--noise-offset and --input-perturbation must be >= 0")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise TrainError(f"--num-classes must be >= 1, got {cfg.num_classes}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise TrainError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    try:
        build_diffusion(cfg)
    except DiffusionError as e:
        raise TrainError(
            f"--noise-schedule {cfg.noise_schedule} with --diffusion-steps {cfg.diffusion_steps} is not a valid "
            f"process ({e}); use more steps or the cosine schedule"
        ) from None


def _validate_objective(cfg: TrainConfig) -> None:
    """The flags that belong to one objective only, and the model names of each family."""
    flow = cfg.objective == OBJECTIVE_FLOW
    if flow and cfg.model in DIT_CONFIGS:
        raise TrainError(f"--objective flow trains a SiT: use --model SiT-{cfg.model.split('-', 1)[1]} or custom")
    if not flow and cfg.model in SIT_CONFIGS:
        raise TrainError(f"--model {cfg.model} is a flow-matching model: add --objective flow "
                         f"(or use --model DiT-{cfg.model.split('-', 1)[1]})")
    if not flow:
        return
    diffusion_only = {"use_kl": cfg.use_kl, "timestep_sampler": cfg.timestep_sampler != "uniform",
                      "loss_weighting": cfg.loss_weighting != "none", "noise_offset": cfg.noise_offset != 0,
                      "input_perturbation": cfg.input_perturbation != 0}
    for flag, given in diffusion_only.items():
        if given:
            raise TrainError(f"--{flag.replace('_', '-')} belongs to the diffusion objective; "
                             "--objective flow trains the velocity with a plain MSE")


def eval_sampler(cfg: TrainConfig) -> str:
    """The evaluation's sampler: --eval-sampler, or the objective's default (ddim for DiT, euler for flow)."""
    return cfg.eval_sampler or EVAL_SAMPLERS[cfg.objective]


def _validate_evaluation(cfg: TrainConfig) -> None:
    """The --eval-* flags that need no file (the reference and the metrics are checked by sampling.evaluate)."""
    if cfg.eval_every < 0:
        raise TrainError(f"--eval-every must be >= 0 (0: no evaluation), got {cfg.eval_every}")
    if not cfg.eval_every:
        if cfg.eval_ref:
            raise TrainError("--eval-ref is the reference of --eval-every STEPS: pass both, or neither")
        return
    if not cfg.eval_ref:
        raise TrainError("--eval-every needs --eval-ref REF.npz, the reference batch to score the samples against "
                         "(e.g. built by python -m evaluation.reference from the training images)")
    for name in ("eval_samples", "eval_steps", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    choices = {"eval_guidance_channels": CHANNEL_MODES, "eval_label_sampling": LABEL_SAMPLING}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise TrainError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is not one of {', '.join(allowed)}")
    try:
        check_sampler(eval_sampler(cfg), OBJECTIVE_FAMILY[cfg.objective])
    except DiffusionError as e:
        raise TrainError(f"--eval-sampler {eval_sampler(cfg)}: {e} (--objective {cfg.objective})") from None
    if cfg.eval_cfg_scale > 1 and cfg.class_dropout == 0:
        raise TrainError(f"--eval-cfg-scale {cfg.eval_cfg_scale:g} needs the null label, which --class-dropout 0 "
                         "never trains; use --eval-cfg-scale 1")


def architecture(cfg: TrainConfig) -> dict[str, int]:
    """depth, hidden_size, num_heads, patch_size of ``--model`` (or of the custom flags)."""
    if cfg.model == CUSTOM_MODEL:
        return {k: int(getattr(cfg, k)) for k in ("depth", "hidden_size", "num_heads", "patch_size")}
    return dict({**DIT_CONFIGS, **SIT_CONFIGS}[cfg.model])


def per_process_batch(cfg: TrainConfig, world_size: int) -> int:
    """global batch = per-process batch x processes x accumulation steps (must divide exactly)."""
    parts = world_size * cfg.grad_accum
    if cfg.global_batch_size % parts:
        raise TrainError(
            f"--global-batch-size {cfg.global_batch_size} is not divisible by {world_size} processes x "
            f"--grad-accum {cfg.grad_accum}"
        )
    return cfg.global_batch_size // parts


def image_workers(cfg: TrainConfig, local_world_size: int) -> int:
    """DataLoader workers per process for decoding images: ``--num-workers``, or by default the CPUs this job
    may use (`available_cpus`, i.e. its affinity mask, not the node's count) shared by the processes on the
    node, one left to each main process, at most AUTO_WORKERS_MAX."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return max(0, min(AUTO_WORKERS_MAX, available_cpus() // max(1, local_world_size) - 1))


# ------------------------------------------------------------------------------------------ randomness


RNG_RULE = ("torch's global generators seeded by MT19937 init_by_array of the key (micro-batch: 2, global_seed, "
            "micro_index * world_size + rank; weight init: 1, global_seed), each number as two 32-bit words")


def micro_batch_key(global_seed: int, micro_index: int, rank: int, world_size: int) -> list[int]:
    """Key of one rank's micro-batch: unique over (global seed, micro-batch, rank), independent of how the run
    was cut (resumed runs reuse the same keys)."""
    return stream_key(STREAM_TRAIN_MICRO_BATCH, global_seed, micro_index * world_size + rank)


def init_key(global_seed: int) -> list[int]:
    """Key of the weight initialisation (its own purpose word: never a micro-batch's key)."""
    return stream_key(STREAM_TRAIN_INIT, global_seed)


def seed_everything(key: list[int]) -> None:
    """Seed the global CPU (and CUDA) generators that draw t, the noise and the dropped labels from `key`."""
    seed_global_generators(key)


def label_drop_mask(batch_size: int, prob: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Classifier-free guidance training: 1 where the label is replaced by the null label (rate ``prob``).

    Passed to ``DiT.forward(..., force_drop_ids=mask)``, which maps those labels to ``num_classes``.
    """
    return (torch.rand(batch_size, device=device) < prob).long()


# ------------------------------------------------------------------------------------------ objective


def build_diffusion(cfg: TrainConfig) -> GaussianDiffusion:
    """The training process: all ``diffusion_steps`` steps, the chosen schedule, target and loss."""
    return create_diffusion(
        "",
        noise_schedule=cfg.noise_schedule,
        use_kl=cfg.use_kl,
        learn_sigma=cfg.learn_sigma,
        predict_v=cfg.prediction == "v",
        diffusion_steps=cfg.diffusion_steps,
    )


def loss_weighting(cfg: TrainConfig) -> LossWeighting:
    """min-SNR-gamma (Hang et al. 2023) or P2 (Choi et al. 2022) weighting of the MSE term, or none."""
    if cfg.loss_weighting == "min_snr":
        return LossWeighting("min_snr", gamma=cfg.snr_gamma)
    if cfg.loss_weighting == "p2":
        return LossWeighting("p2", gamma=cfg.p2_gamma, k=cfg.p2_k)
    return LossWeighting("none")


def diffusion_loss(
    diffusion: GaussianDiffusion,
    model: Any,
    x_start: torch.Tensor,
    t: torch.Tensor,
    model_kwargs: dict[str, Any],
    cfg: TrainConfig,
    importance: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample losses [B] of one micro-batch (noise from the global RNG, seeded per micro-batch).

    loss_t = w_SNR(t) * ||target - output||^2 (+ L_vlb,t with stop-gradient on the mean when learning
    sigma: the improved-DDPM hybrid objective), multiplied by the importance weight 1 / (T p_t) when t
    is importance-sampled. Returns the diffusion's terms with "loss" replaced by that product and the
    unweighted per-sample loss kept as "raw_loss" (what the importance sampler records).
    """
    weighting = None if cfg.use_kl else loss_weighting(cfg)
    terms = diffusion.training_losses(
        model,
        x_start,
        t,
        model_kwargs=model_kwargs,
        loss_weighting=weighting,
        noise_offset=cfg.noise_offset,
        input_perturbation=cfg.input_perturbation,
    )
    terms["raw_loss"] = terms["loss"].detach()
    if importance is not None:
        terms["loss"] = terms["loss"] * importance
    return terms


def flow_loss(model: Any, x_start: torch.Tensor, model_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-sample flow-matching losses [B] of one micro-batch (SiT's objective, the network in SiT's convention).

    t ~ U[0, 1] and the noise come from the global generators (seeded per micro-batch, as the diffusion
    loss's); x_t = (1 - t) x + t noise with t = 1 noise, the network sees 1 - t and learns x - noise
    (``diffusion.flow_loss``). Returns "loss" and "raw_loss" (the same values, detached) like `diffusion_loss`.
    """
    t = sample_flow_times(x_start.shape[0], x_start.device)
    noise = torch.randn_like(x_start)
    terms = flow_matching_loss(model, x_start, t, noise, FAMILY_SIT, model_kwargs)
    terms["raw_loss"] = terms["loss"].detach()
    return terms


# ------------------------------------------------------------------------------------------ optimisation


def param_groups(model: nn.Module, label_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: the class-embedding table with ``lr_mult`` = label_lr_mult, everything else 1.

    With Adam every entry moves by about lr per step, so an embedding row (D entries) changes its output by
    ~sqrt(D) lr while a dense layer's output changes by ~fan_in lr (the muP argument for a larger input-layer
    learning rate); the multiplier lets the label signal grow as fast as the timestep embedding.
    """
    table = model.y_embedder.embedding_table.weight
    rest = [p for p in model.parameters() if p.requires_grad and p is not table]
    return [{"params": rest, "lr_mult": 1.0}, {"params": [table], "lr_mult": float(label_lr_mult)}]


def learning_rate(
    step: int, base_lr: float, warmup_steps: int = 0, decay_every: int = 0, decay_factor: float = 0.5
) -> float:
    """Linear warm-up from base/warmup to base over ``warmup_steps``, then x decay_factor every
    ``decay_every`` steps after the warm-up (step decay; 0 disables either part)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay_every > 0:
        return base_lr * decay_factor ** ((step - warmup_steps) // decay_every)
    return base_lr


def ema_decay_at(step: int, decay: float, warmup: bool = False) -> float:
    """The EMA decay used after optimizer step ``step``; with warm-up min(decay, (1 + s) / (10 + s))."""
    if warmup:
        return min(decay, (1.0 + step) / (EMA_WARMUP_OFFSET + step))
    return decay


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel on CUDA (one launch for all tensors), the default elsewhere.

    Build it once the model is on ``device``: `load_state_dict` then puts the state beside the parameters.
    """
    groups = param_groups(model, cfg.label_lr_mult)
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (frozen ones included).

    Two multi-tensor ops (`_foreach_mul_`, `_foreach_add_`) instead of two kernels per tensor; the same
    operations as ``e.mul_(decay).add_(p, alpha=1 - decay)`` tensor by tensor, so the same numbers.
    """
    ema_params = dict(ema.named_parameters())
    targets, sources = [], []
    for name, param in model.named_parameters():
        target = ema_params[name]
        targets.append(target)
        sources.append(param.detach().to(target.dtype))
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, sources, alpha=1.0 - decay)


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "checkpoints"


def checkpoint_path(results_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(results_dir) / f"{step:0{CHECKPOINT_DIGITS}d}.pt"


def list_checkpoints(results_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first (temp files are ignored)."""
    folder = checkpoint_dir(results_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(results_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(results_dir)
    return found[-1][1] if found else None


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """`save_torch`: atomic (a killed job never leaves a half file), a write error is one line naming ``path``."""
    return save_torch(payload, path)


def prune_checkpoints(results_dir: str | os.PathLike, limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``limit`` remain; returns the removed paths."""
    if limit is None:
        return []
    found = list_checkpoints(results_dir)
    removed = [p for _, p in found[: max(0, len(found) - limit)]]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def load_training_checkpoint(path: str | os.PathLike, flag: str = "--resume") -> dict[str, Any]:
    """A train.py checkpoint with every key needed to resume (weights_only load).

    Memory-mapped when the file has torch's zip format (every train.py checkpoint): the ranks of a node
    share the page cache instead of each holding the whole file in RAM. Any unreadable, truncated or foreign
    file is one TrainError line naming it (``flag`` names the option it came from).
    """
    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TrainError(f"{flag} {path} cannot be read ({os_reason(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception:
        raise TrainError(
            f"{flag} {path} is truncated, damaged or not a torch checkpoint ({path.stat().st_size} bytes); "
            f"delete it or pass another {flag}"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise TrainError(f"{flag} {path} is not a train.py checkpoint (missing {', '.join(missing)})")
    return obj


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike) -> None:
    """The architecture and the class map of the checkpoint must be the ones being trained."""
    for key in ARCH_KEYS:
        if saved.get(key) != current.get(key):
            raise TrainError(
                f"--resume {path} has {key}={saved.get(key)} but this run has {key}={current.get(key)}"
            )
    saved_objective = saved.get("objective", OBJECTIVE_DIFFUSION)  # checkpoints from before --objective
    if saved_objective != current.get("objective", OBJECTIVE_DIFFUSION):
        raise TrainError(f"--resume {path} was trained with --objective {saved_objective}, "
                         f"this run has --objective {current.get('objective')}")


def checkpoint_config(cfg: TrainConfig, arch: dict[str, Any]) -> dict[str, Any]:
    """The stored config: the architecture keys models.checkpoints reads, plus every training argument, and the
    model family the objective makes (``family``: dit or sit; models.checkpoints samples it accordingly)."""
    config = cfg.to_dict()
    config.update(arch)
    config["model"] = cfg.model
    config["family"] = OBJECTIVE_FAMILY[cfg.objective]
    return config


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def export_ema(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Keep only what sampling needs: {"ema", "config", "class_to_idx", "step"} (for shipping weights)."""
    obj = load_training_checkpoint(src, flag="--export")
    slim = {k: obj[k] for k in ("ema", "config", "class_to_idx", "step")}
    slim["ema"] = {k: v.clone() for k, v in slim["ema"].items()}  # no views into the optimizer blob
    return save_checkpoint(slim, dst)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the EMA weights of a train.py checkpoint to a small file.")
    p.add_argument("--export", nargs=2, metavar=("CKPT", "OUT"), required=True)
    a = p.parse_args(argv)

    def body() -> int:
        out = export_ema(*a.export)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
        return EXIT_OK

    return run_command(lambda: None, lambda _: body())


if __name__ == "__main__":
    raise SystemExit(_main())
