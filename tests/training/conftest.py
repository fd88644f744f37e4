"""Fixtures for the training tests: tiny configurations, a tiny image folder, runners for train.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_ARCH = dict(model="custom", depth=1, hidden_size=32, num_heads=2, patch_size=2)
TINY_SIZE = 8  # 8x8 images: 16 tokens with patch 2
FOLDER_CLASSES = ("zebra", "apple")  # created in this order; sorted order gives apple=0, zebra=1
IMAGES_PER_CLASS = 8


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DIT_CPU_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_script(nproc: int, script: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`python script` (nproc 1) or torchrun --standalone --nproc_per_node=nproc (gloo on CPU)."""
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "--monitor-interval=0.2",
            script,
            *args,
        ]
    return subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 8x8 RGB PNGs: 'zebra' bright on top, 'apple' bright at the bottom, plus noise."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(FOLDER_CLASSES):
        folder = root / name
        folder.mkdir()
        for i in range(IMAGES_PER_CLASS):
            img = rng.integers(0, 60, size=(TINY_SIZE, TINY_SIZE, 3))
            rows = slice(0, TINY_SIZE // 2) if c == 0 else slice(TINY_SIZE // 2, TINY_SIZE)
            img[rows] += 180
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised diffusers AutoencoderKL (2x downsampling, 4 latent channels) saved locally."""
    from diffusers import AutoencoderKL

    vae_dir = tmp_path_factory.mktemp("vae")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=TINY_SIZE,
    ).save_pretrained(vae_dir)
    return vae_dir


@pytest.fixture
def tiny_config(image_folder: Path, tmp_path: Path):
    """Factory: TrainConfig(**overrides) of a tiny pixel-space run on the image folder in tmp_path/run."""
    from models.training import TrainConfig, validate

    def make(**overrides) -> TrainConfig:
        values = dict(
            dataset="folder",
            data_path=str(image_folder),
            image_size=TINY_SIZE,
            vae="none",
            global_batch_size=4,
            max_steps=4,
            ckpt_every=2,
            log_every=1,
            lr=1e-3,
            ema_decay=0.9,
            results_dir=str(tmp_path / "run"),
            progress=False,
            num_workers=0,  # no worker processes to start in tiny runs (the default is tested on its own)
            **TINY_ARCH,
        )
        values.update(overrides)
        cfg = TrainConfig(**values)
        validate(cfg)
        return cfg

    return make


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def train_run():
    """Run train.run(cfg) in this process (world size 1) and return its exit code."""
    import train

    def go(cfg) -> int:
        return train.run(cfg)

    return go
