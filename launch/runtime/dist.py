"""Process-group helpers: the only module of the project that calls torch.distributed.

Works the same under torchrun (NCCL on CUDA, gloo on CPU) and as a plain `python script.py`
(world size 1, no process group). Modelled on the small helper modules of EDM and DiT.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from launch.runtime.errors import EXIT_FAILED, UserError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0
FAILED_SUFFIX = ".failed"  # <report dir>/.rank-<r>.failed: a rank's one-line reason, for the other ranks
ALIVE_SUFFIX = ".alive"  # <report dir>/.rank-<r>.alive: touched at every heartbeat
FAILURE_WAIT_S = 2.0  # a survivor waits this long for the failing rank's reason to appear
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a collective timeout beyond a week is a typo (and overflows the C++ side)
CPU_THREADS_ENV = "DIT_CPU_THREADS"  # threads per process on CPU (default: the cores shared by the local ranks)


class DistConfigError(UserError):
    """The job's layout or environment cannot work (more processes than GPUs, a half-set torchrun environment)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_info: DistInfo | None = None
_last: DistInfo | None = None  # the layout before shutdown(): node_first still knows the node
_report_dir: Path | None = None


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise DistConfigError(f"environment variable {name}={value!r}: expected an integer >= {minimum}")
    return number


def check_launch_env() -> None:
    """torchrun sets RANK and WORLD_SIZE (and LOCAL_RANK, LOCAL_WORLD_SIZE) together: one without the other (a
    script exporting WORLD_SIZE by hand, say), a value that is not a number, or a rank beyond the world is one
    line, before any work. DIT_CPU_THREADS, when set, is a positive integer."""
    if (os.environ.get("RANK") in (None, "")) != (os.environ.get("WORLD_SIZE") in (None, "")):
        raise DistConfigError("RANK and WORLD_SIZE must be set together (torchrun sets both); unset them to run as "
                              "one process")
    world, rank = _env_int("WORLD_SIZE", 1, 1), _env_int("RANK", 0)
    if rank >= world:
        raise DistConfigError(f"RANK={rank} but WORLD_SIZE={world}: a rank must be below the world size")
    _env_int("LOCAL_RANK", 0)
    _env_int("LOCAL_WORLD_SIZE", 1, 1)
    _env_int(CPU_THREADS_ENV, 1, 1)


def check_timeout(timeout_s: float, flag: str) -> None:
    """A collective timeout in seconds: finite, positive, at most a week (one line naming `flag`)."""
    if not 0 < timeout_s <= MAX_TIMEOUT_S:  # NaN fails both comparisons
        raise DistConfigError(f"{flag} {timeout_s}: give seconds in (0, {MAX_TIMEOUT_S:.0f}]")


def init(timeout_s: float | None = None, use_cuda: bool | None = None) -> DistInfo:
    """Join the process group started by torchrun, or run as a single process.

    `timeout_s` bounds every collective, so a hung rank ends the job instead of blocking it.
    `use_cuda=None` picks CUDA when a GPU is visible.
    """
    global _info, _last
    if _info is not None:
        return _info
    check_launch_env()
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda:
        visible = torch.cuda.device_count()
        if local_world > visible:
            raise DistConfigError(f"{local_world} processes on this node but {visible} GPU(s) visible; start "
                                  f"torchrun --nproc_per_node={visible} (or fewer), or check CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        _set_cpu_threads(local_world)
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if use_cuda:
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        rank, world = dist.get_rank(), dist.get_world_size()
    _info = _last = DistInfo(rank, world, local_rank, local_world, device)
    return _info


def _set_cpu_threads(local_world: int) -> None:
    """torchrun sets OMP_NUM_THREADS=1 per worker; share the cores deliberately instead."""
    if os.environ.get(CPU_THREADS_ENV):
        torch.set_num_threads(_env_int(CPU_THREADS_ENV, 1, 1))
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_world)))


def info() -> DistInfo:
    return _info if _info is not None else init()


def _env_as_given(name: str, default: int) -> int:
    """A launch variable read without judging it (check_launch_env does that): `default` when it is not a
    number, so that reporting a bad environment does not fail on it."""
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def rank() -> int:
    return _info.rank if _info is not None else _env_as_given("RANK", 0)


def world_size() -> int:
    return _info.world_size if _info is not None else _env_as_given("WORLD_SIZE", 1)


def is_main() -> bool:
    return rank() == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size() -> int:
    """Processes in the live process group (1 when there is none, or after `shutdown`)."""
    return dist.get_world_size() if _active() else 1


def print0(*args: Any, **kwargs: Any) -> None:
    """Print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if _active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[info().device.index])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (float64 stays float64) and return it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Gather tensors whose first dimension may differ between ranks (returned on tensor's device)."""
    if not _active():
        return [tensor]
    sizes = all_gather_object(tuple(tensor.shape))
    longest = max(s[0] for s in sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[: s[0]] for p, s in zip(parts, sizes)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _on_main_then_tell(fn: Callable[[], T], share_result: bool) -> tuple[bool, T | None]:
    """Run `fn` on rank 0; every rank learns whether it failed (and, optionally, its result)."""
    if is_main():
        try:
            result = fn()
        except Exception as exc:
            broadcast_object((False, exc))
            raise
        broadcast_object((True, result if share_result else None))
        return True, result
    ok, value = broadcast_object(None)
    if not ok:
        raise value
    return False, value


def node_first(fn: Callable[[], T], key: str) -> T:
    """Run `fn` (a download into a cache, then a load) one process at a time on each node.

    The first process of the node to take the node-local lock fetches; the others wait on the lock, not in a
    collective that a slow download could time out, then run `fn` themselves and find the cache. Each node
    fetches into its own (node-local) cache; on a shared cache the atomic rename makes a second fetch harmless.
    """
    if _last is None or _last.local_world_size == 1:
        return fn()
    # One lock file per user and key, kept (unlinking a flock'ed file races with its waiters): jobs of the same
    # user on the node that fetch the same thing take turns too, which is what a shared cache needs.
    name = hashlib.sha256(f"{os.getuid()}|{key}".encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"dit-fid-{name}.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        try:
            return fn()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def rank0_then_others(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 first (e.g. a download), then on the others (which read the cache).

    If rank 0 fails, every rank raises the same exception at once instead of waiting
    for a collective timeout.
    """
    if not _active():
        return fn()
    ran, result = _on_main_then_tell(fn, share_result=False)
    return result if ran else fn()  # type: ignore[return-value]


def rank0_shares(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its (picklable) result, or its exception, to every rank."""
    if not _active():
        return fn()
    return _on_main_then_tell(fn, share_result=True)[1]  # type: ignore[return-value]


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over the ranks (one small collective)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info().device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_progress(done: int, stop: bool) -> tuple[int, bool]:
    """(images done by all ranks, whether any rank was asked to stop): one small collective per batch."""
    total, stops = sum_over_ranks([float(done), float(stop)])
    return int(total), stops > 0


def report_failures_in(folder: Path) -> None:
    """Record this job's per-rank failure reasons and heartbeats in `folder` (a run folder all ranks see)."""
    global _report_dir
    _report_dir = folder
    heartbeat()


def _rank_file(r: int, suffix: str) -> Path | None:
    return _report_dir / f".rank-{r}{suffix}" if _report_dir is not None else None


def heartbeat() -> None:
    """Mark this rank alive (the sampler calls it between batches); a stuck rank is then named by the others."""
    path = _rank_file(rank(), ALIVE_SUFFIX)
    if path is not None:
        with contextlib.suppress(OSError):
            path.touch()


def record_failure(message: str) -> None:
    """Leave this rank's one-line reason where the other ranks look when their collectives break."""
    path = _rank_file(rank(), FAILED_SUFFIX)
    if path is not None:
        with contextlib.suppress(OSError):
            path.write_text(f"{time.time():.3f} {message}\n")


def clear_reports(folder: Path) -> None:
    """Remove the failure and heartbeat files of `folder` (left by an earlier run, or a finished one)."""
    for suffix in (FAILED_SUFFIX, ALIVE_SUFFIX):
        for path in folder.glob(f".rank-*{suffix}"):
            path.unlink(missing_ok=True)


def peer_explanation() -> str | None:
    """Why this rank's collective broke, from the OTHER ranks' records: the first of them that failed and its
    line, or the one that stopped making progress (stopped, stuck, or killed without a word)."""
    if _report_dir is None or world_size() == 1:
        return None
    others = [r for r in range(world_size()) if r != rank()]
    deadline = time.time() + FAILURE_WAIT_S
    while True:
        failed = []
        for r in others:
            with contextlib.suppress(OSError, ValueError):
                stamp, line = _rank_file(r, FAILED_SUFFIX).read_text().strip().split(" ", 1)
                failed.append((float(stamp), r, line))
        if failed or time.time() > deadline:
            break
        time.sleep(FAILURE_WAIT_S / 10)
    if failed:
        _, r, line = min(failed)
        return f"rank {r} failed first: {line}"
    beats = []
    for r in others:
        with contextlib.suppress(OSError):
            beats.append((_rank_file(r, ALIVE_SUFFIX).stat().st_mtime, r))
    if not beats:
        return None
    stamp, r = min(beats)
    return f"rank {r} stopped making progress {time.time() - stamp:.0f} s ago (stuck, stopped or killed)"


def _broken_collective(exc: BaseException) -> bool:
    """A failure caused by a peer: a collective that timed out or lost its connection."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        m in text for m in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out"))


def fail(message: str, code: int = EXIT_FAILED, peer_caused: bool = False) -> None:
    """Print `message` prefixed with the rank and end this process now, without teardown.

    The line is also recorded for the other ranks (see `report_failures_in`). When a peer caused it
    (`peer_caused`: a broken or timed-out collective), the peer's own line, or the name of the rank that
    stopped, is printed last. os._exit skips atexit/destructors that could block on a dead peer; torchrun
    sees the non-zero exit and stops the others.
    """
    prefix = f"[rank {rank()}] " if world_size() > 1 else ""
    if not peer_caused:
        record_failure(message)
    err = sys.__stderr__  # not sys.stderr: init_process_group may have wrapped it in a buffer os._exit drops
    print(f"{prefix}{message}", file=err, flush=True)
    peer = peer_explanation() if peer_caused else None
    if peer is not None:
        print(f"{prefix}cause: {peer}", file=err, flush=True)
    sys.stdout.flush()
    os._exit(code)


def install_fail_fast() -> None:
    """Turn an uncaught exception on any rank into one named line and an immediate exit."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if not issubclass(exc_type, KeyboardInterrupt):
            traceback.print_exception(exc_type, exc, tb)
        fail(f"failed: {exc_type.__name__}: {exc}", peer_caused=_broken_collective(exc))

    sys.excepthook = hook


def shutdown() -> None:
    """Leave the process group (local operation; never waits for other ranks)."""
    global _info
    if _active():
        dist.destroy_process_group()
    _info = None
