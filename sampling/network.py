"""What sampling runs on, loaded once per process: the model and its codec (`load_network`, or a `Network` made
directly from a model in memory, as train.py's evaluation does), and the sampler over the checkpoint's own noise
schedule (`build_sampler`)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from diffusion import DEFAULT_DIFFUSION_STEPS, DiffusionError
from diffusion.flow import FAMILY_DIT, FAMILY_REPA, FLOW_FAMILIES, FlowSampler
from diffusion.guidance import CHANNELS_ALL, CHANNELS_FIRST3
from diffusion.samplers import DDIM, Sampler
from launch.runtime import dist
from models.checkpoints import build_model, checkpoint_channels, load_checkpoint, published_checkpoint
from models.vae import CODEC_NONE, PIXEL_CHANNEL_CHOICES, UINT8_DIT, UINT8_REPA, Codec, load_codec
from sampling.config import ConfigError, SampleConfig, validate


@dataclass
class Network:
    """The model (eval mode, on the device, compiled with --compile), its codec, the checkpoint file it came from
    and what that file says about it (`meta`: family and its evidence, training config, class map)."""

    model: torch.nn.Module
    codec: Codec
    checkpoint: str
    meta: dict

    @property
    def family(self) -> str:
        return self.meta.get("family", FAMILY_DIT)


def autocast(cfg: SampleConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the model under --precision bf16."""
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_network(cfg: SampleConfig, device: torch.device) -> Network:
    """Model and codec on `device`: the checkpoint is read first (its channels choose the pixel codec), the
    codec loaded once. On each node one process downloads first; the others then read the cache."""
    ckpt = cfg.ckpt or str(dist.node_first(lambda: published_checkpoint(cfg.published), f"weights-{cfg.published}"))
    loaded = load_checkpoint(ckpt, allow_pickle=cfg.allow_pickle, model_name=cfg.model)
    meta = loaded[1]
    dist.print0(f"model family {meta.get('family', FAMILY_DIT)}"
                f"{' (assumed)' if meta.get('family_assumed') else ''}: {meta.get('family_evidence', 'DiT keys')}")
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
        model = compiled(model, cfg, device)
    return Network(model, codec, ckpt, meta)


def _check_class_map(meta: dict, cfg: SampleConfig) -> None:
    class_to_idx = meta.get("class_to_idx")
    if class_to_idx and len(class_to_idx) != cfg.num_classes:
        raise ConfigError(f"checkpoint {cfg.ckpt} was trained on {len(class_to_idx)} classes "
                          f"but --num-classes is {cfg.num_classes}")


def forward_shapes(cfg: SampleConfig) -> list[int]:
    """The batch sizes the model sees: 2B when guided (batch doubled inside), B where guidance is off."""
    guided = cfg.cfg_scale > 1
    shapes = [2 * cfg.per_proc_batch_size] if guided else [cfg.per_proc_batch_size]
    if guided and cfg.guidance_interval is not None:
        shapes.append(cfg.per_proc_batch_size)  # outside the interval: the plain conditional call
    return shapes


@torch.no_grad()
def compiled(model: torch.nn.Module, cfg: SampleConfig, device: torch.device) -> torch.nn.Module:
    """torch.compile(model) warmed up on every batch shape it will see; the eager model if compiling fails.

    Every batch is padded to --per-proc-batch-size, so these shapes are the only ones: no recompile.
    """
    fast = torch.compile(model, mode=cfg.compile_mode)
    start = time.perf_counter()
    try:
        for batch in forward_shapes(cfg):
            x = torch.zeros(batch, model.in_channels, model.input_size, model.input_size, device=device)
            t = torch.zeros(batch, dtype=torch.long, device=device)
            with autocast(cfg, device):
                fast(x, t, t)
    except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler on the node: sampling still works eagerly
        dist.print0(f"warning: --compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                    "sampling without it")
        return model
    dist.print0(f"compiled the model (mode {cfg.compile_mode}, batch shapes {forward_shapes(cfg)}) in "
                f"{time.perf_counter() - start:.1f} s")
    return fast


def trained_objective(meta: dict) -> dict:
    """The diffusion a train.py checkpoint was trained with (official checkpoints: DiT's defaults)."""
    config = meta.get("config") or {}
    return {"predict_v": config.get("prediction") == "v",
            "noise_schedule": config.get("noise_schedule", "linear"),
            "diffusion_steps": int(config.get("diffusion_steps", DEFAULT_DIFFUSION_STEPS))}


def settle(cfg: SampleConfig, network: Network) -> SampleConfig:
    """The configuration with the checkpoint's exact family and the family's defaults for what the command line
    and the preset left open: guidance channels (REPA: all, else first3) and the uint8 conversion (REPA's own for
    a REPA checkpoint, else DiT's). Checked again: a sampler of the other family is one line."""
    family = network.family
    repa = family == FAMILY_REPA
    settled = cfg.replace(family=family,
                          guidance_channels=cfg.guidance_channels or (CHANNELS_ALL if repa else CHANNELS_FIRST3),
                          to_uint8=cfg.to_uint8 or (UINT8_REPA if repa else UINT8_DIT))
    validate(settled)
    return settled


def build_sampler(cfg: SampleConfig, network: Network) -> Sampler | FlowSampler:
    """The --sampler for the checkpoint's family: a flow sampler for SiT and REPA; for DiT, on the checkpoint's
    own noise schedule and prediction type."""
    if network.family in FLOW_FAMILIES:
        try:
            return FlowSampler(cfg.sampler, cfg.num_sampling_steps, family=network.family)
        except DiffusionError as exc:
            raise ConfigError(f"--sampler {cfg.sampler} --num-sampling-steps {cfg.num_sampling_steps}: {exc}") from None
    objective = trained_objective(network.meta)
    if cfg.guidance_interval is not None and cfg.guidance_interval[1] > objective["diffusion_steps"] - 1:
        raise ConfigError(f"--guidance-interval {cfg.guidance_interval[0]:g} {cfg.guidance_interval[1]:g}: the "
                          f"checkpoint's timesteps run from 0 to {objective['diffusion_steps'] - 1}")
    try:
        return Sampler(cfg.sampler, cfg.num_sampling_steps, learn_sigma=network.model.learn_sigma,
                       eta=cfg.ddim_eta if cfg.sampler == DDIM else 0.0, **objective)
    except DiffusionError as exc:
        raise ConfigError(f"--sampler {cfg.sampler} --num-sampling-steps {cfg.num_sampling_steps}: {exc}") from None
