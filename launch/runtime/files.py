"""File helpers shared by every package: hashing, atomic writes, downloads and the cache folders.

One home for each: the sampler, the evaluator, training, the checkpoints, the VAE, Inception and the
prefetch command all write through `atomic_write` (temporary name beside the target, optional fsync,
rename) and download through `download`, so a killed process never leaves a half file under a final
name and every failure is one line naming the file and the cause. Imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from launch.runtime.errors import RankError, UserError

HASH_CHUNK_BYTES = 1 << 22
COPY_CHUNK_BYTES = 1 << 22
CONNECT_TIMEOUT_S = 10.0  # an unreachable host fails within this; no retries
READ_TIMEOUT_S = 60.0  # a connected mirror may pause longer than the connect timeout
REASON_CHARS = 160
TEMP_MARK = ".tmp-"  # every temporary file is `.<name>.tmp-<pid>-<thread>`: `remove_stale_temps` finds them
_TRUE = {"1", "on", "yes", "true"}


class FileWriteError(RankError):
    """A write failed (disk full, permissions, size limit) on this rank's node; the line names the file."""


class DownloadError(UserError):
    """A download failed (offline, HTTP error, truncated); the line names the URL."""


def env_true(name: str) -> bool:
    """An environment flag such as HF_HUB_OFFLINE=1 (1, on, yes, true; any case)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def os_reason(exc: OSError) -> str:
    """`No space left on device` rather than `[Errno 28] No space left on device: '/x/.y.tmp-1'`."""
    return exc.strerror or str(exc) or type(exc).__name__


def root_reason(exc: BaseException) -> str:
    """`Type: message` of the innermost cause, on one short line (hub errors wrap the socket error)."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:REASON_CHARS]


def temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique per process and thread, hidden, found by `remove_stale_temps`."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}")


def remove_stale_temps(folder: Path) -> int:
    """Delete temporary files left in `folder` by a killed writer; returns how many."""
    stale = list(folder.glob(f".*{TEMP_MARK}*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = False,
                 what: str = "") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it is renamed to `path`.

    Any OSError (disk full, file-size limit, permissions) removes the temporary file and is raised as
    FileWriteError naming `path` (`cannot write <what> <path>: <cause>`, `what` saying which kind of file it is);
    other errors remove it and propagate. `path` is never half written: it keeps its old content until the
    rename. `fsync` makes the content durable before the rename (manifests, checkpoints); the parent folder is
    created when missing.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # e.g. the parent is a file: no temporary was made
            tmp.unlink(missing_ok=True)
        raise FileWriteError(f"cannot write {what + ' ' if what else ''}{path}: {os_reason(exc)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any], fsync: bool = True) -> None:
    with atomic_write(path, "w", fsync=fsync) as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def download(url: str, dest: str | os.PathLike, connect_timeout_s: float = CONNECT_TIMEOUT_S,
             read_timeout_s: float = READ_TIMEOUT_S) -> Path:
    """Stream `url` (http(s) or file://) into `dest` through `atomic_write`; checks Content-Length.

    Raises DownloadError with one line (`cannot download URL (Type: reason)`) for any network,
    HTTP or length failure, and FileWriteError when `dest` cannot be written.
    """
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=connect_timeout_s) as response:
            sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
            if sock is not None:  # connected: reads may pause longer than the connect timeout
                sock.settimeout(read_timeout_s)
            expected = int(response.headers.get("Content-Length") or -1)
            with atomic_write(dest) as out:
                shutil.copyfileobj(response, out, COPY_CHUNK_BYTES)
                size = out.tell()
                if expected >= 0 and size != expected:
                    raise DownloadError(f"cannot download {url} (incomplete: {size} of {expected} bytes)")
    except (FileWriteError, DownloadError):
        raise
    except (OSError, ValueError, urllib.error.URLError) as exc:
        raise DownloadError(f"cannot download {url} ({root_reason(exc)})") from None
    return dest


def torch_hub_checkpoints() -> Path:
    """torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints): official DiT files, Inception weights."""
    import torch  # the runtime's only torch use outside dist; kept local so file helpers import fast

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants  # optional dependency of diffusers; only needed for the default

    return Path(constants.HF_HUB_CACHE)


def available_cpus() -> int:
    """CPUs this process may run on (a SLURM allocation, taskset), not the node's total."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
