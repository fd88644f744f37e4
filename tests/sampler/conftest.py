"""Fixtures for the sampler tests: tiny checkpoints and VAE made here, and a torchrun runner."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_ARCH = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2)
NUM_CLASSES = 10  # deliberately not 1000: the null label must be index 10


def sampler_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DIT_CPU_THREADS="1", TORCH_HOME=str(ROOT / ".no-torch-home"))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def sampler_cmd(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "sample_ddp.py", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--monitor-interval=0.2", "sample_ddp.py", *args]


def run_sampler(nproc: int, args: list[str], timeout: float = 180,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(sampler_cmd(nproc, args), cwd=ROOT, env={**sampler_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def start_sampler(nproc: int, args: list[str], launcher: str = "torch.distributed.run") -> subprocess.Popen:
    """Start the sampler (under `python -m <launcher>` when nproc > 1) in its own session."""
    cmd = sampler_cmd(nproc, args)
    if nproc > 1:
        cmd[2] = launcher
    return subprocess.Popen(cmd, cwd=ROOT, env=sampler_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_files(folder: Path, pattern: str, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if folder.exists() and len(list(folder.glob(pattern))) >= count:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{count} files {pattern} did not appear in {folder}")


@pytest.fixture(scope="session")
def tiny_pixel_ckpt(tmp_path_factory) -> Path:
    from models.demo import save_checkpoint, untrained_dit

    net, config = untrained_dit("custom", input_size=8, in_channels=3, num_classes=NUM_CLASSES, seed=1, **TINY_ARCH)
    return save_checkpoint(net, config, tmp_path_factory.mktemp("ckpt") / "tiny-pixel.pt")


@pytest.fixture(scope="session")
def tiny_latent_ckpt(tmp_path_factory) -> Path:
    from models.demo import save_checkpoint, untrained_dit

    net, config = untrained_dit("custom", input_size=4, in_channels=4, num_classes=NUM_CLASSES, seed=2, **TINY_ARCH)
    return save_checkpoint(net, config, tmp_path_factory.mktemp("ckpt") / "tiny-latent.pt")


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A diffusers AutoencoderKL with 4 blocks (latents are 1/8 of the image), saved locally."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    out = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(out)
    return out


def worker_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent` (torchrun's workers), sorted."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(entry.name))
    return sorted(pids)


class Sampler:
    """What the tests need to drive sample_ddp.py (exposed as the `sampler` fixture)."""

    num_classes = NUM_CLASSES
    run = staticmethod(run_sampler)
    start = staticmethod(start_sampler)
    wait_for_files = staticmethod(wait_for_files)
    worker_pids = staticmethod(worker_pids)

    def __init__(self, pixel_ckpt: Path):
        self.pixel_ckpt = pixel_ckpt

    def pixel_args(self, sample_dir: Path, n: int, batch: int, *extra: str, steps: int = 10) -> list[str]:
        return ["--model", "custom", "--ckpt", str(self.pixel_ckpt), "--image-size", "8", "--vae", "none",
                "--num-classes", str(NUM_CLASSES), "--cfg-scale", "2.0", "--num-fid-samples", str(n),
                "--per-proc-batch-size", str(batch), "--num-sampling-steps", str(steps),
                "--sample-dir", str(sample_dir), *extra]


@pytest.fixture(scope="session")
def sampler(tiny_pixel_ckpt) -> Sampler:
    return Sampler(tiny_pixel_ckpt)
