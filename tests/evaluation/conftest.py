"""Shared fixtures for the evaluation tests: locally made Inception and tiny DINOv2 weights, tiny image batches.

Inception costs ~150 ms per image on a CPU core, so the weights, the extractor and the features of the
two small batches are made once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_dinov2 import make_dinov2_state
from fake_inception import IMAGE_SIDE, StandInExtractor, make_images, make_random_inception_state

from evaluation import dinov2
from evaluation.dinov2 import DinoV2Extractor, DinoV2Weights, resolve_dinov2_weights
from evaluation.inception import InceptionExtractor, InceptionWeights

NUM_REF = 8
NUM_SAMPLE = 8
SMALL_DINOV2_DIM = 64  # one 64-d head


REPO = Path(__file__).resolve().parents[2]
TORCHRUN_TIMEOUT_S = 180


def write_npz(path: Path, images: np.ndarray, **extras: np.ndarray) -> Path:
    np.savez(path, arr_0=images, **extras)
    return path


@pytest.fixture(scope="session")
def torchrun() -> Callable[[list[str]], subprocess.CompletedProcess]:
    """Run `torchrun --standalone --nproc_per_node=2 ARGS` (gloo, one CPU thread per rank) from the repository."""

    def run(args: list[str]) -> subprocess.CompletedProcess:
        env = {**os.environ, "DIT_CPU_THREADS": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)

    return run


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(make_random_inception_state(), path)
    return path


@pytest.fixture(scope="session")
def weights(weights_file: Path) -> InceptionWeights:
    return InceptionWeights(weights_file, "explicit", has_classifier=True)


@pytest.fixture(scope="session")
def extractor(weights: InceptionWeights) -> InceptionExtractor:
    return InceptionExtractor(weights, "cpu", batch_size=8)


@pytest.fixture
def stand_in(weights: InceptionWeights) -> StandInExtractor:
    """The cheap stand-in network (fresh, so its `calls` counter starts at 0)."""
    return StandInExtractor(weights, "cpu", batch_size=4)


def make_flat_images(seed: int, n: int, side: int = IMAGE_SIDE) -> np.ndarray:
    """Images of one random colour each."""
    colours = np.random.default_rng(seed).integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
    return np.broadcast_to(colours, (n, side, side, 3)).copy()


# Two modes per set, one shared (noise), so precision and recall are both strictly between 0 and 1.
@pytest.fixture(scope="session")
def ref_images() -> np.ndarray:
    return np.concatenate([make_images(1, NUM_REF // 2), make_flat_images(7, NUM_REF - NUM_REF // 2)])


@pytest.fixture(scope="session")
def sample_images() -> np.ndarray:
    return np.concatenate([make_images(2, NUM_SAMPLE // 2, smooth=True), make_images(3, NUM_SAMPLE - NUM_SAMPLE // 2)])


@pytest.fixture(scope="session")
def batch_files(tmp_path_factory: pytest.TempPathFactory, ref_images: np.ndarray,
                sample_images: np.ndarray) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("batches")
    return write_npz(folder / "ref.npz", ref_images), write_npz(folder / "sample.npz", sample_images)


@pytest.fixture(scope="session")
def features(extractor: InceptionExtractor, ref_images: np.ndarray,
             sample_images: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per-image features of both batches (float64 numpy), extracted once."""
    out = {}
    for name, images in (("ref", ref_images), ("sample", sample_images)):
        got = extractor.extract(images)
        out[name] = {k: v.double().numpy() for k, v in got.items()}
    return out


@pytest.fixture(scope="session")
def dinov2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DINOv2 (64-d, 1 block, patch 14, 37 x 37 position grid) in the official layout: ~5 ms an image."""
    path = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2.pth"
    torch.save(make_dinov2_state(dim=SMALL_DINOV2_DIM, depth=1), path)
    return path


@pytest.fixture(scope="session")
def dinov2_weights(dinov2_file: Path) -> DinoV2Weights:
    return resolve_dinov2_weights(dinov2_file, allow_download=False, arch=None)


@pytest.fixture(scope="session")
def dinov2_extractor(dinov2_weights: DinoV2Weights) -> DinoV2Extractor:
    return DinoV2Extractor(dinov2_weights, "cpu", batch_size=8)


@pytest.fixture
def any_dinov2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands take the (tiny) architecture of a --dinov2-weights file instead of insisting on ViT-L/14."""
    monkeypatch.setattr(dinov2, "METRIC_ARCH", None)
