"""Fixtures for the launch tests: a real one-host SLURM cluster (slurm_cluster.py), a stand-in `scontrol` for
the unit tests of common.sh, a tiny pixel DiT, locally made Inception weights and a reference batch."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from slurm_cluster import SlurmCluster, Unavailable

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "launch" / "slurm"
TINY_ARCH = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2)
NUM_CLASSES = 10
IMAGE_SIZE = 8
NUM_SAMPLES = 24
BATCH = 2
STEPS = 100
EVAL_IMAGES = 6  # images per batch in the evaluation tests (precision/recall need more than k=3)
EVAL_STEPS = 10
SLURM_SUMMARY: list[str] = []  # lines for the end of pytest's report: the cluster used, or why it was skipped

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# fake scontrol: `requeue ID` is recorded.
echo "scontrol $*" >>"$FAKE_SLURM_DIR/calls.log"
case "$1" in
  requeue) echo "requeue $2" >>"$FAKE_SLURM_DIR/requeue.log" ;;
  *) exit 1 ;;
esac
"""


@dataclass
class FakeSlurm:
    """A stand-in `scontrol` in `dir` (bin/ first on PATH) that records requeues, for the unit tests of
    common.sh's functions; the jobs themselves run on the real cluster (slurm_cluster.py)."""

    dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        for k in ("NPROC", "TORCHRUN", "DIT_PROGRAM", "DIT_ROOT", "CUDA_VISIBLE_DEVICES"):
            env.pop(k, None)
        env.update(PATH=f"{self.dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", FAKE_SLURM_DIR=str(self.dir),
                   PYTHON=sys.executable)
        env.update(extra)
        return env

    def calls(self, name: str = "calls.log") -> list[str]:
        path = self.dir / name
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def fake_slurm(tmp_path: Path) -> FakeSlurm:
    bin_dir = tmp_path / "slurm" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    return FakeSlurm(tmp_path / "slurm")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real one-host SLURM cluster with two nodes (slurm_cluster.py); skips where it cannot run."""
    try:
        cluster = SlurmCluster.start()
    except Unavailable as exc:
        SLURM_SUMMARY.append(f"real SLURM cluster tests skipped: {exc}")
        pytest.skip(f"real SLURM cluster unavailable: {exc}")
    SLURM_SUMMARY.append(f"real SLURM cluster: nodes {', '.join(cluster.nodes)}, up in {cluster.started_in_s:.1f} s")
    yield cluster
    cluster.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in SLURM_SUMMARY:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.demo import save_checkpoint, untrained_dit

    net, config = untrained_dit("custom", input_size=IMAGE_SIZE, in_channels=3, num_classes=NUM_CLASSES,
                                seed=3, **TINY_ARCH)
    return save_checkpoint(net, config, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def sampler_args(ckpt: Path, sample_dir: Path, n: int = NUM_SAMPLES, steps: int = STEPS) -> list[str]:
    return ["--model", "custom", "--ckpt", str(ckpt), "--image-size", str(IMAGE_SIZE), "--vae", "none",
            "--num-classes", str(NUM_CLASSES), "--num-fid-samples", str(n),
            "--per-proc-batch-size", str(BATCH), "--num-sampling-steps", str(steps),
            "--sample-dir", str(sample_dir)]


def run_dir_of(sample_dir: Path) -> Path:
    """The one run folder the sampler made under `sample_dir`."""
    (run,) = [p for p in sample_dir.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from fake_inception import make_random_inception_state

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(make_random_inception_state(), path)
    return path


@pytest.fixture(scope="session")
def ref_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few random 8x8 reference images (ADM layout: arr_0 uint8 NHWC)."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (EVAL_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    return path
