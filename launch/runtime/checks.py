"""Checks of command-line values that every command makes the same way, before any work: one line naming the
flag the user typed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from launch.runtime.errors import UserError
from launch.runtime.files import os_reason, temp_path

PROBE_NAME = "write-test"  # a folder is tried with a hidden temporary of this name


class FlagError(UserError):
    """A flag's value cannot be used."""


def check_positive(values: Mapping[str, float]) -> None:
    """Each `--flag: value` must be a finite number of at least 1 (counts, batch sizes)."""
    for flag, value in values.items():
        if not (math.isfinite(value) and value >= 1):
            raise FlagError(f"{flag} must be positive, got {value}")


def check_writable(path: str | Path, flag: str) -> Path:
    """An output file the command writes at the end, tried now: an existing folder we may write in."""
    path = Path(path)
    if path.is_dir():
        raise FlagError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise FlagError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    _probe(temp_path(path), flag, path)
    return path


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """An output folder the command writes into at the end: created now if missing, and tried."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlagError(f"{flag} {path}: cannot create it ({os_reason(exc)})") from None
    _probe(temp_path(path / PROBE_NAME), flag, path)
    return path


def _probe(probe: Path, flag: str, shown: Path) -> None:
    """Create and delete `probe`: what writing `shown` will meet (permissions, a read-only file system)."""
    try:
        probe.open("wb").close()
        probe.unlink()
    except OSError as exc:
        raise FlagError(f"{flag} {shown}: cannot write there ({os_reason(exc)})") from None
