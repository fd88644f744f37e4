"""A sampling run's folder: its name, its manifest, and what is still missing in it.

<sample-dir>/<run>/            000000.png ... (N files, one per global index; --save png), grid.png, manifest.json
<sample-dir>/<run>/images/     image shards (--save npz; none: the grid's images), see evaluation/shards.py
<sample-dir>/<run>/features-<weights id>/   Inception feature blocks (--ref), one folder per weights file
<sample-dir>/.<run>.lock       held by the run that is sampling into <run>/ (host, pid, SLURM job id)
<sample-dir>/<run>.npz         the packed ADM batch
<sample-dir>/<run>.metrics.json   the evaluator's report (--ref)
The manifest's "identity" is everything that changes the images; a rerun with another identity
is refused unless --overwrite, so a folder never mixes samples of two configurations; one run at a
time holds the folder's lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from launch.runtime.files import os_reason, read_json, write_json_atomic

MANIFEST_NAME = "manifest.json"
GRID_NAME = "grid.png"
MANIFEST_VERSION = 1
LOCK_SUFFIX = ".lock"  # <sample-dir>/.<run>.lock, beside the folder (which --overwrite may replace)
LOCK_STALE_S = 1800.0  # a holder refreshes its lock between batches; silent this long, it is gone
LOCK_WRITE_GRACE_S = 5.0  # an empty lock file younger than this is being written by its holder


class RunDirError(Exception):
    """The run folder cannot be used as asked; the message is one line."""


def run_name(model: str, ckpt: str | None, image_size: int, vae: str, cfg_scale: float, global_seed: int,
             sampler: str, steps: int | str, guidance_interval: tuple[float, float] | None = None) -> str:
    """The official sample_ddp.py folder name plus the sampler and its step count (and the guidance interval
    when there is one, so that a sweep over intervals gets one folder per interval).

    e.g. DiT-XL-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0-ddpm-250, ...-ddpm-250-gi-0-600
    """
    model_part = model.replace("/", "-")
    ckpt_part = os.path.basename(ckpt).replace(".pt", "") if ckpt else "pretrained"
    interval = f"-gi-{guidance_interval[0]:g}-{guidance_interval[1]:g}" if guidance_interval else ""
    return (f"{model_part}-{ckpt_part}-size-{image_size}-vae-{vae}-cfg-{cfg_scale}-seed-{global_seed}"
            f"-{sampler}-{steps}{interval}")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """`manifest.json` of a run folder, its one owner: created once, a session added per start, finished.

    Holds the identity (what changes the images), the configuration, the seed and label rules, the labels,
    the package versions and one entry per session (world size, batch size, device, started, finished).
    Every change is written at once, atomically (fsync + rename).
    """

    def __init__(self, run_dir: Path, data: dict[str, Any]):
        self.path = run_dir / MANIFEST_NAME
        self.data = data

    @classmethod
    def read(cls, run_dir: Path) -> Manifest | None:
        """The folder's manifest, or None when it has none; RunDirError when it is damaged."""
        path = run_dir / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            data = read_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
                raise ValueError("no identity")
        except (OSError, ValueError) as exc:
            kept = sum(1 for _ in run_dir.glob("[0-9]*.png"))
            raise RunDirError(f"{path} is damaged ({exc}); its {kept} images cannot be checked against this "
                              "configuration: restore the file, or move the folder away and sample anew") from None
        return cls(run_dir, data)

    @property
    def identity(self) -> dict[str, Any]:
        return self.data["identity"]

    def start_session(self, **fields: Any) -> None:
        self.data.setdefault("sessions", []).append({"started": now(), **fields})
        self.write()

    def finish_session(self, **fields: Any) -> None:
        self.data["sessions"][-1].update(finished=now(), **fields)
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.data)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _check_parent(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create --sample-dir {parent}: {os_reason(exc)}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"--sample-dir {parent} is not writable; choose another with --sample-dir")


def _probe_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"cannot write into {run_dir}: {os_reason(exc)}") from None


def prepare(run_dir: Path, identity: Mapping[str, Any], overwrite: bool,
            lock: RunLock | None = None) -> Manifest | None:
    """Create `run_dir` or check that it was made with the same `identity`.

    Returns the existing manifest (None for a new folder). A folder made with the same identity is always
    resumed, `overwrite` or not (a job script that keeps --overwrite across requeues never wipes its own
    progress); `overwrite` only replaces a folder made with another identity or one without a manifest.
    Raises RunDirError for an unwritable place, a folder locked by another run (`lock` is taken first and
    released again on failure) or, without `overwrite`, a folder of another configuration.
    """
    _check_parent(run_dir.parent)
    if lock is not None:
        lock.acquire()
    try:
        return _adopt(run_dir, identity, overwrite)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _adopt(run_dir: Path, identity: Mapping[str, Any], overwrite: bool) -> Manifest | None:
    manifest = Manifest.read(run_dir) if run_dir.exists() else None
    if manifest is not None:
        diffs = _differences(manifest.identity, identity)
        if diffs and not overwrite:
            raise RunDirError(f"{run_dir} holds samples of another configuration ({'; '.join(diffs)}); "
                              "pass --overwrite to replace them or choose another --sample-dir")
        if diffs:
            shutil.rmtree(run_dir)
            manifest = None
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"{run_dir} is not empty and has no {MANIFEST_NAME}; pass --overwrite to replace it")
        shutil.rmtree(run_dir)
    _probe_writable(run_dir)
    return manifest


class RunLock:
    """An exclusive lock on a run folder: `.<run>.lock` beside it, holding host, pid and SLURM job id, taken
    atomically (O_EXCL).

    A second run on the same folder gets RunDirError naming the holder. A lock is stale, and taken over,
    when its process is gone (same host), when it belongs to an earlier run of this same SLURM job (a
    requeue lands on another node), or when its holder has not refreshed it for LOCK_STALE_S seconds.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir.parent / f".{run_dir.name}{LOCK_SUFFIX}"
        self.run_dir = run_dir
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
              "since": now()}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder, me):
                    who = f"{holder.get('host')}:{holder.get('pid')}" if holder else "an unknown process"
                    raise RunDirError(f"{self.run_dir} is in use by another run ({who} since "
                                      f"{holder.get('since') if holder else '?'}); wait for it, or delete "
                                      f"{self.path} if that run is gone") from None
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise RunDirError(f"cannot lock {self.run_dir}: {os_reason(exc)}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunDirError(f"cannot lock {self.run_dir}: {self.path} keeps reappearing; is another run starting?")

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = read_json(self.path)
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict[str, Any] | None, me: dict[str, Any]) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True  # gone meanwhile
        if holder is None:
            return age > LOCK_WRITE_GRACE_S  # a lock being written has no content for an instant
        if me["job"] is not None and holder.get("job") == me["job"]:
            return True  # an earlier run of this job (requeued); it cannot still be running
        if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", 0))):
            return True
        return age > LOCK_STALE_S

    def refresh(self) -> None:
        """Tell other runs that the holder is alive (called between batches)."""
        if self.held:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


