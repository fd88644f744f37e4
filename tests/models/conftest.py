"""Shared fixtures for tests/models: tiny DiT architectures, random non-zero weights, a tiny VAE folder."""

from __future__ import annotations

import math

import pytest
import torch

from models.dit import DIT_CONFIGS, DiT

# Tiny stand-ins registered next to the 12 real configs (build_model validates names against DIT_CONFIGS).
TINY_CONFIGS = {
    "DiT-T/2": dict(depth=2, hidden_size=32, patch_size=2, num_heads=4),
    "DiT-T/4": dict(depth=2, hidden_size=32, patch_size=4, num_heads=4),
    "DiT-U/2": dict(depth=3, hidden_size=48, patch_size=2, num_heads=4),
}


@pytest.fixture
def tiny_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, int]]:
    """Register the tiny configs for the duration of one test."""
    for name, cfg in TINY_CONFIGS.items():
        monkeypatch.setitem(DIT_CONFIGS, name, cfg)
    return TINY_CONFIGS


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every trainable tensor with O(1)-activation random values (adaLN and output non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:  # pos_embed keeps its fixed sin-cos values
                continue
            if name.endswith("embedding_table.weight"):
                std = 1.0
            elif p.ndim >= 2:
                std = 1.0 / math.sqrt(p[0].numel())  # ~unit-variance outputs
            else:
                std = 0.1
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


@pytest.fixture
def randomize():
    """Function fixture: randomize(model, seed) -> model with random non-zero weights."""
    return _randomize


@pytest.fixture
def tiny_model(tiny_registry) -> DiT:
    """A random DiT-T/2 on 8x8 inputs with 4 channels and 10 classes, in eval mode."""
    model = DiT(input_size=8, in_channels=4, num_classes=10, **tiny_registry["DiT-T/2"])
    return _randomize(model).eval()


def _save_tiny_vae(path, blocks: int):
    """A tiny diffusers AutoencoderKL with ``blocks`` blocks (downsample 2**(blocks-1), 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(8,) * blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny VAE saved with save_pretrained: 4 blocks -> downsample 8 (as the SD VAE), 4 latent channels."""
    return _save_tiny_vae(tmp_path_factory.mktemp("tiny_vae"), blocks=4)


@pytest.fixture(scope="session")
def tiny_vae4_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny VAE with another downsampling factor: 3 blocks -> 4."""
    return _save_tiny_vae(tmp_path_factory.mktemp("tiny_vae4"), blocks=3)
