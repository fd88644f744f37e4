"""A sampling run's folder: its name, its manifest, and what is still missing in it.

<sample-dir>/<run>/            000000.png ... (N files, one per global index), grid.png, manifest.json
<sample-dir>/<run>.npz         the packed ADM batch
The manifest's "identity" is everything that changes the images; a rerun with another identity
is refused unless --overwrite, so a folder never mixes samples of two configurations.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
GRID_NAME = "grid.png"
MANIFEST_VERSION = 1


class RunDirError(Exception):
    """The run folder cannot be used as asked; the message is one line."""


def run_name(model: str, ckpt: str | None, image_size: int, vae: str, cfg_scale: float, global_seed: int,
             sampler: str, steps: int | str) -> str:
    """The official sample_ddp.py folder name plus the sampler and its step count.

    e.g. DiT-XL-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0-ddpm-250
    """
    model_part = model.replace("/", "-")
    ckpt_part = os.path.basename(ckpt).replace(".pt", "") if ckpt else "pretrained"
    return (f"{model_part}-{ckpt_part}-size-{image_size}-vae-{vae}-cfg-{cfg_scale}-seed-{global_seed}"
            f"-{sampler}-{steps}")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is unreadable ({exc}); pass --overwrite to start the folder anew") from None


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare(run_dir: Path, identity: Mapping[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Create `run_dir` or check that it was made with the same `identity`.

    Returns the existing manifest (None for a new folder). With `overwrite`, an existing folder
    is emptied first. Raises RunDirError for an unwritable place or a mismatching folder.
    """
    parent = run_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create --sample-dir {parent}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"--sample-dir {parent} is not writable; choose another with --sample-dir")
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    manifest = read_manifest(run_dir) if run_dir.exists() else None
    if manifest is not None:
        diffs = _differences(manifest.get("identity", {}), identity)
        if diffs:
            raise RunDirError(f"{run_dir} holds samples of another configuration ({'; '.join(diffs)}); "
                              "pass --overwrite to replace them or choose another --sample-dir")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir} is not empty and has no {MANIFEST_NAME}; pass --overwrite to replace it")
    try:
        run_dir.mkdir(exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"cannot write into {run_dir}: {exc.strerror or exc}") from None
    return manifest


def scan_missing(run_dir: Path, num_samples: int, world_size: int, rank: int,
                 filename: Callable[[int], str], is_valid: Callable[[Path], bool]) -> list[int]:
    """Indices (of this rank's strided share of 0..N-1) whose PNG is absent or does not decode.

    Truncated files are removed so that they are written again.
    """
    missing = []
    for i in range(rank, num_samples, world_size):
        path = run_dir / filename(i)
        if not path.exists():
            missing.append(i)
        elif not is_valid(path):
            path.unlink(missing_ok=True)
            missing.append(i)
    return missing


