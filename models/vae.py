"""Codecs between model space and images: the Stable Diffusion VAE (latent DiT) and the identity (pixel DiT).

Both decode to what ADM sample batches store: uint8 NHWC RGB on the CPU, mapped from [-1, 1] by
``clamp(127.5 * x + 128, 0, 255)`` then truncation (as DiT's sample_ddp.py).
Loading is offline-first: the Hugging Face cache is tried before any network access, and when the hub is
unreachable the failure is a one-line :class:`CodecError` within seconds instead of a retry loop.
"""

from __future__ import annotations

import os
import socket
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from launch.runtime.errors import UserError
from launch.runtime.files import env_true, hf_hub_cache

VAE_SCALE_FACTOR = 0.18215  # latent scaling of the SD VAE (Rombach et al. 2022), as used by DiT
VAE_REPOS: dict[str, str] = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
CODEC_NONE = "none"  # pixel space: the identity codec
CODEC_CHOICES = (*VAE_REPOS, CODEC_NONE)  # the --vae choices of the sampler and of train.py
VAE_CONFIG = "config.json"  # a diffusers AutoencoderKL folder: config + one weights file
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # preferred first
PIXEL_CHANNEL_CHOICES = (1, 3)
RGB_CHANNELS = 3
UINT8_SCALE = 127.5
UINT8_MAX = 255
UINT8_DIT, UINT8_REPA = "dit", "repa"
# [-1, 1] -> clamp(scale * x + offset, 0, 255), truncated: DiT's and SiT's clamp(127.5 x + 128) maps [-1, 1] to
# [0.5, 255.5]; REPA's clamp(255 (x + 1) / 2) = clamp(127.5 x + 127.5) is half a level darker.
UINT8_OFFSETS = {UINT8_DIT: 128.0, UINT8_REPA: 127.5}
UINT8_RULES = {UINT8_DIT: "clamp(127.5 x + 128, 0, 255), truncated (DiT, SiT)",
               UINT8_REPA: "clamp(255 (x + 1) / 2, 0, 255), truncated (REPA)"}
HUB_PROBE_TIMEOUT_S = 3.0  # TCP connect to the hub endpoint before trying a download
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class CodecError(UserError):
    """The codec cannot be loaded (one-line message naming the flag to fix)."""


def to_uint8_nhwc(x: torch.Tensor, rule: str = UINT8_DIT) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] -> contiguous uint8 [B, H, W, C] on the CPU (`rule`: UINT8_RULES).

    The mapping and the uint8 conversion run on ``x``'s device, so a GPU sends the host one byte per pixel
    value instead of four (a float tensor copied to the host with a dtype change is converted on the host).
    """
    x = torch.clamp(UINT8_SCALE * x.float() + UINT8_OFFSETS[rule], 0, UINT8_MAX)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


class Codec(ABC):
    """Maps model space to images and back. ``downsample``: image side / model input side; ``source``: the
    command-line setting that chose it (named in error messages)."""

    downsample: int = 1
    latent_channels: int
    source: str

    def latent_size(self, image_size: int) -> int:
        """The model input side for ``image_size`` pixels, or a one-line :class:`CodecError`."""
        if image_size < self.downsample or image_size % self.downsample:
            raise CodecError(
                f"--image-size {image_size} is not a multiple of the downsampling factor {self.downsample} of "
                f"{self.source}; use a multiple of {self.downsample}"
            )
        return image_size // self.downsample

    @abstractmethod
    def decode(self, z: torch.Tensor, uint8: str = UINT8_DIT) -> torch.Tensor:
        """Model outputs [B, C, h, w] -> uint8 images [B, H, W, 3] on the CPU (`uint8`: the UINT8_RULES rule)."""

    @abstractmethod
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> model inputs."""


class PixelCodec(Codec):
    """Identity codec for pixel-space models (``--vae none``); 1-channel images decode to grey RGB."""

    source = f"--vae {CODEC_NONE}"

    def __init__(self, image_channels: int = RGB_CHANNELS) -> None:
        if image_channels not in PIXEL_CHANNEL_CHOICES:
            raise CodecError(f"pixel codec supports 1 or 3 image channels, got {image_channels}")
        self.latent_channels = image_channels

    def decode(self, z: torch.Tensor, uint8: str = UINT8_DIT) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (CPU)."""
        img = to_uint8_nhwc(z, uint8)
        return img.expand(-1, -1, -1, RGB_CHANNELS).contiguous() if img.shape[-1] == 1 else img

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Images in [-1, 1] are already model inputs."""
        return x.float()


class LatentCodec(Codec):
    """diffusers ``AutoencoderKL`` with DiT's latent scaling; ``downsample`` from the VAE config."""

    def __init__(self, vae: Any, device: torch.device | str = "cpu", source: str = "--vae") -> None:
        self.vae = vae
        self.device = torch.device(device)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)  # one 2x step per extra block
        self.latent_channels = int(vae.config.latent_channels)
        self.source = source

    @torch.no_grad()
    def decode(self, z: torch.Tensor, uint8: str = UINT8_DIT) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> uint8 [B, h*ds, w*ds, 3] (CPU); uint8 made on the VAE's device."""
        z = (z / VAE_SCALE_FACTOR).to(self.device, dtype=self.vae.dtype)
        return to_uint8_nhwc(self.vae.decode(z).sample, uint8)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents (a posterior sample, or its mean)."""
        dist = self.vae.encode(x.to(self.device, dtype=self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return z.float() * VAE_SCALE_FACTOR


def _hub_reachable() -> tuple[bool, str]:
    """Quick TCP probe of the hub endpoint (skipped behind a proxy, where only the client knows the way)."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True, ""
    from huggingface_hub import constants  # diffusers' dependency; imported only to probe the hub

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True, ""
    except OSError as e:
        return False, f"{url.hostname}:{port} unreachable: {e}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:120]


def _load_vae(vae: str, vae_path: str | os.PathLike | None, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL  # seconds to import: only when a VAE is loaded

    kwargs = dict(torch_dtype=dtype, low_cpu_mem_usage=False)  # no `accelerate` needed, no warning
    hint = f"pass --vae-path DIR or run `python -m launch.prefetch --vae {vae}` on a machine with internet"
    if vae_path is not None:
        path = Path(vae_path)
        if not (path / VAE_CONFIG).is_file() and (path / "vae" / VAE_CONFIG).is_file():
            path = path / "vae"  # a full Stable Diffusion pipeline folder
        if not (path / VAE_CONFIG).is_file():
            raise CodecError(f"--vae-path {vae_path} is not a diffusers AutoencoderKL folder (no {VAE_CONFIG})")
        try:
            return AutoencoderKL.from_pretrained(path, local_files_only=True, **kwargs)
        except Exception as e:  # OSError, ValueError, safetensors errors ...
            raise CodecError(f"--vae-path {vae_path} cannot be loaded ({_first_line(e)})") from None

    repo = VAE_REPOS[vae]
    cache_dir = str(hf_hub_cache())
    try:
        with warnings.catch_warnings():  # diffusers passes a deprecated hub argument; not our concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return AutoencoderKL.from_pretrained(repo, cache_dir=cache_dir, local_files_only=True, **kwargs)
    except Exception:  # not cached (or cached incompletely): maybe the network helps
        pass
    if env_true("HF_HUB_OFFLINE"):
        raise CodecError(f"VAE {repo} is not in the Hugging Face cache {cache_dir} and HF_HUB_OFFLINE is set; {hint}")
    reachable, why = _hub_reachable()
    if not reachable:
        raise CodecError(f"VAE {repo} is not cached and the hub is offline ({why}); {hint}")
    try:
        return AutoencoderKL.from_pretrained(repo, cache_dir=cache_dir, **kwargs)
    except Exception as e:
        raise CodecError(f"cannot download VAE {repo} ({_first_line(e)}); {hint}") from None


def load_codec(
    vae: str = "ema",
    vae_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    image_channels: int = RGB_CHANNELS,
    dtype: torch.dtype = torch.float32,
) -> Codec:
    """The codec for ``--vae {ema,mse,none}``; ``vae_path`` (a local diffusers folder) overrides the repo."""
    if vae not in CODEC_CHOICES:
        raise CodecError(f"--vae {vae} is unknown; choose one of {', '.join(CODEC_CHOICES)}")
    if vae == CODEC_NONE:
        return PixelCodec(image_channels)
    model = _load_vae(vae, vae_path, dtype)
    model = model.to(device=device).eval().requires_grad_(False)
    return LatentCodec(model, device, source=f"--vae-path {vae_path}" if vae_path is not None else f"--vae {vae}")
