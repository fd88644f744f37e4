"""A sampling run's folder, its one owner: the layout, the manifest, the lock, the image and feature blocks, and
the plan of what a resumed run still owes.

<sample-dir>/<run>/                      000000.png ... (one per global index; --save png), grid.png, manifest.json
<sample-dir>/<run>/images/               image shards (--save npz; --save none: the grid's images), see blocks.py
<sample-dir>/<run>/features-<weights id>/   feature blocks of one feature network's weights (metrics in the job)
<sample-dir>/<run>/set-aside/            blocks this run did not write, or found damaged: kept for a look, never read
<sample-dir>/.<run>.lock                 held by the run that is sampling into <run>/ (host, pid, SLURM job id)
<sample-dir>/<run>.npz                   the packed ADM batch
<sample-dir>/<run>.metrics.json          the evaluator's report of the images in <run>.npz

The manifest's "identity" is everything that changes the images; a rerun with another identity is refused unless
--overwrite, so a folder never mixes samples of two configurations. Every block carries the id of that identity
and a checksum of its arrays: a block copied in from another run, or damaged on disk, is set aside with a warning
and its images are made again. One run at a time holds the folder's lock.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launch.runtime.blocks import READ_ERRORS, Block, check_block, load_block, write_block
from launch.runtime.errors import UserError
from launch.runtime.files import os_reason, read_json, remove_stale_temps, temp_path, write_json_atomic
from launch.runtime.npzfile import NpzWriter

MANIFEST_NAME = "manifest.json"
GRID_NAME = "grid.png"
GRID_SIZE = 64  # grid.png shows the first 64 images (--save none keeps just those on disk)
IMAGES_DIR = "images"
FEATURES_PREFIX = "features-"
SET_ASIDE_DIR = "set-aside"
NPZ_SUFFIX = ".npz"  # <sample-dir>/<run>.npz
METRICS_SUFFIX = ".metrics.json"  # <sample-dir>/<run>.metrics.json
PNG_SUFFIX = ".png"
MIN_NAME_DIGITS = 6  # {index:06d}.png, as the official sampler; wider beyond 10**6 images
MANIFEST_VERSION = 1
RUN_ID_CHARS = 16  # the identity's id in every block: a prefix of its sha256
IMAGES_KEY = "arr_0"  # an image shard's array, as in ADM batches
LABELS_KEY = "arr_1"
RGB_CHANNELS = 3
IMAGES_CONTENT = "images"
IMAGE_SHARD = "image shard"  # how an error or warning names a block of each kind
FEATURE_BLOCK = "feature block"
WRITE_PROBE = "write-test"  # a probe file, under a temporary name (see _probe_writable)
ASSEMBLE_CHUNK = 256  # images copied at once into the .npz
LOCK_SUFFIX = ".lock"  # <sample-dir>/.<run>.lock, beside the folder (which --overwrite may replace)
LOCK_STALE_S = 1800.0  # a holder refreshes its lock between batches; silent this long, it is gone
LOCK_WRITE_GRACE_S = 5.0  # an empty lock file younger than this is being written by its holder


class RunDirError(UserError):
    """The run folder cannot be used as asked."""


def name_digits(num_images: int) -> int:
    """Digits of every index in a file name: 6, or more when there are more than 10**6 images."""
    return max(MIN_NAME_DIGITS, len(str(max(0, num_images - 1))))


def index_filename(index: int, num_images: int) -> str:
    """`{index:06d}.png` (wider beyond 10**6 images): sample `index`'s PNG."""
    return f"{index:0{name_digits(num_images)}d}{PNG_SUFFIX}"


def block_name(indices: np.ndarray, num_images: int) -> str:
    """`<first>-<last>-<count>.npz`: two blocks of one folder never share an index, so never a name."""
    digits = name_digits(num_images)
    return f"{int(indices[0]):0{digits}d}-{int(indices[-1]):0{digits}d}-{len(indices)}{NPZ_SUFFIX}"


def run_id(identity: Mapping[str, Any]) -> str:
    """The id every block of a run carries: a hash of its identity."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:RUN_ID_CHARS]


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run: `<sample-dir>/<run>/` and the files beside it."""

    path: Path

    @property
    def npz(self) -> Path:
        return Path(f"{self.path}{NPZ_SUFFIX}")  # the run name holds dots ("cfg-1.5"): no with_suffix

    @property
    def metrics(self) -> Path:
        return Path(f"{self.path}{METRICS_SUFFIX}")

    @property
    def images(self) -> Path:
        return self.path / IMAGES_DIR

    @property
    def grid(self) -> Path:
        return self.path / GRID_NAME

    @property
    def set_aside(self) -> Path:
        return self.path / SET_ASIDE_DIR

    def png(self, index: int, num_images: int) -> Path:
        return self.path / index_filename(index, num_images)

    def features(self, weights_id: str) -> Path:
        """The folder of the feature blocks extracted with the weights of id `weights_id`."""
        return self.path / f"{FEATURES_PREFIX}{weights_id}"

    def remove_temporaries(self) -> int:
        """Temporary files left by a killed writer: in the folder, its block folders, and the `.npz` and metrics
        being written beside it (only this run's names). Call with the lock held."""
        folders = [self.path, self.images, *self.path.glob(f"{FEATURES_PREFIX}*")]
        count = sum(remove_stale_temps(d) for d in folders if d.is_dir())
        for target in (self.npz, self.metrics):
            for tmp in self.path.parent.glob(f".{target.name}.tmp-*"):
                tmp.unlink(missing_ok=True)
                count += 1
        return count


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
        probe = temp_path(run_dir / WRITE_PROBE)  # a temporary name: a kill right here leaves nothing for long
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


def _replace(run_dir: Path) -> None:
    """Delete a folder that --overwrite replaces; a symbolic link is never followed into its target."""
    if run_dir.is_symlink():
        raise RunDirError(f"{run_dir} is a symbolic link; --overwrite does not delete through links: remove the "
                          "link, or pass the real folder's parent as --sample-dir")
    shutil.rmtree(run_dir)


def _adopt(run_dir: Path, identity: Mapping[str, Any], overwrite: bool) -> Manifest | None:
    manifest = Manifest.read(run_dir) if run_dir.exists() else None
    if manifest is not None:
        diffs = _differences(manifest.identity, identity)
        if diffs and not overwrite:
            raise RunDirError(f"{run_dir} holds samples of another configuration ({'; '.join(diffs)}); "
                              "pass --overwrite to replace them or choose another --sample-dir")
        if diffs:
            _replace(run_dir)
            manifest = None
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"{run_dir} is not empty and has no {MANIFEST_NAME}; pass --overwrite to replace it")
        _replace(run_dir)
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




# --------------------------------------------------------------------------------------------- blocks


def block_kind(path: Path) -> str:
    """`image shard` or `feature block`, from the folder a block lies in."""
    return IMAGE_SHARD if path.parent.name == IMAGES_DIR else FEATURE_BLOCK


def set_aside(path: Path, reason: str) -> None:
    """Move a block this run cannot use into `<run>/set-aside/` (never read again) and say so in a warning."""
    folder = path.parent.parent / SET_ASIDE_DIR if path.parent.name != SET_ASIDE_DIR else path.parent
    target = folder / f"{path.parent.name}-{path.name}"
    try:
        folder.mkdir(exist_ok=True)
        os.replace(path, target)
        where = f"moved to {target}"
    except OSError:
        path.unlink(missing_ok=True)
        where = "deleted"
    redo = "its images are made again" if block_kind(path) == IMAGE_SHARD else "its features are computed again"
    warnings.warn(f"{block_kind(path)} {path}: {reason}; {where}, {redo}", stacklevel=2)


def scan_blocks(folder: Path, num_images: int, rows: Mapping[str, tuple[tuple[int, ...], np.dtype]], run: str,
                content: str) -> list[Block]:
    """The blocks of `folder` this run wrote, in name order (headers and origins only; `verify_blocks` reads
    their data). A block of another run or content, of the wrong shape, unreadable, or repeating an index of an
    earlier block is set aside."""
    blocks: list[Block] = []
    seen = np.zeros(num_images, bool)
    for path in sorted(folder.glob(f"[0-9]*{NPZ_SUFFIX}")) if folder.is_dir() else []:
        found = check_block(path, num_images, rows, run, content)
        if isinstance(found, Block) and seen[found.indices].any():
            found = "repeats sample indices of another block"
        if isinstance(found, str):
            set_aside(path, found)
            continue
        seen[found.indices] = True
        blocks.append(found)
    return blocks


def damaged_blocks(blocks: Iterable[Block], names: Sequence[str]) -> list[tuple[Path, str]]:
    """(path, why) of each block whose arrays `names` do not read back or match their checksums (full read)."""
    bad = []
    for block in blocks:
        try:
            load_block(block.path, names)
        except READ_ERRORS as exc:
            bad.append((block.path, f"damaged ({type(exc).__name__}: {str(exc)[:120]})"))
    return bad


def image_rows(image_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """What an image shard holds per index: one uint8 HWC image."""
    return {IMAGES_KEY: ((image_size, image_size, RGB_CHANNELS), np.dtype(np.uint8))}


def feature_rows(dims: Mapping[str, int]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """What a feature block holds per index: a float32 row of each kind (kind -> width)."""
    return {kind: ((d,), np.dtype(np.float32)) for kind, d in dims.items()}


def features_content(weights_id: str) -> str:
    return f"{FEATURES_PREFIX}{weights_id}"


def load_features(blocks: Iterable[Block], kinds: Iterable[str]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(indices, kind -> rows) of each block in turn, every array checked; RunDirError for a block that changed
    since the scan (it is set aside first, so a rerun redoes it)."""
    kinds = list(kinds)
    for block in blocks:
        try:
            arrays = load_block(block.path, kinds)
        except READ_ERRORS as exc:
            set_aside(block.path, f"damaged ({type(exc).__name__}: {str(exc)[:120]})")
            raise RunDirError(f"feature block {block.path} changed on disk while the run read it; it was set "
                              "aside: rerun the same command to compute its features again") from None
        yield arrays["indices"], {kind: arrays[kind] for kind in kinds}


class ImageShards:
    """The image shards of a run folder: which indices they hold, and those images by index, each shard read
    whole and checked against its checksums the first time it is used."""

    def __init__(self, blocks: list[Block], num_images: int, image_size: int):
        self.blocks, self.num_images = blocks, num_images
        self.shape = (image_size, image_size, RGB_CHANNELS)
        self.shard = np.full(num_images, -1, np.int64)  # [N]: which block holds image i (-1: none)
        self.row = np.zeros(num_images, np.int64)  # [N]: its row there
        for s, block in enumerate(blocks):
            self.shard[block.indices] = s
            self.row[block.indices] = np.arange(block.indices.shape[0])
        self._cached: tuple[int, np.ndarray] | None = None  # one checked shard in memory

    @classmethod
    def scan(cls, run_dir: Path, num_images: int, image_size: int, run: str) -> ImageShards:
        blocks = scan_blocks(run_dir / IMAGES_DIR, num_images, image_rows(image_size), run, IMAGES_CONTENT)
        return cls(blocks, num_images, image_size)

    @property
    def kept(self) -> np.ndarray:
        """bool [N]: image i is in a shard."""
        return self.shard >= 0

    def _images(self, s: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != s:
            path = self.blocks[s].path
            try:
                images = load_block(path, [IMAGES_KEY])[IMAGES_KEY]
            except READ_ERRORS as exc:
                why = f"{type(exc).__name__}: {str(exc)[:120]}"
                set_aside(path, f"damaged ({why})")
                raise RunDirError(f"image shard {path} is damaged ({why}); it was set aside: rerun the sampling "
                                  "command (without --pack-only) to make its images again") from None
            self._cached = (s, images)
        return self._cached[1]

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images of the global `indices`, uint8 [k, H, W, 3], in that order."""
        idx = np.asarray(indices, np.int64)
        shard = self.shard[idx]
        if (shard < 0).any():
            raise RunDirError(f"image {int(idx[shard < 0][0])} is in no image shard; rerun the sampler to finish "
                              "the run")
        out = np.empty((idx.shape[0], *self.shape), np.uint8)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._images(int(s))[self.row[idx[sel]]]
        return out


def assemble_npz(shards: ImageShards, out: Path, labels: np.ndarray | None = None) -> Path:
    """Copy every image 0..N-1 from the shards into the ADM batch `out` (arr_0, arr_1 = labels), streamed in
    index order from shards checked against their checksums, nothing decoded; written under a temporary name
    and renamed, so an `out` already there is replaced only by a complete, checked batch."""
    n = shards.num_images
    missing = np.flatnonzero(~shards.kept)
    if missing.size:
        raise RunDirError(f"the image shards lack {missing.size} of {n} images (first: {missing[0]}); rerun the "
                          "sampler to finish them")
    extras = {LABELS_KEY: np.asarray(labels, dtype=np.int64)} if labels is not None else None
    with NpzWriter(out, IMAGES_KEY, n, shards.shape) as writer:
        for a in range(0, n, ASSEMBLE_CHUNK):
            writer.write(shards.read(np.arange(a, min(n, a + ASSEMBLE_CHUNK))))
        return writer.close(extras)


# --------------------------------------------------------------------------------------------- resume plan


@dataclass
class ResumePlan:
    """The work a run folder still owes."""

    to_sample: list[int]  # sorted global indices whose image is sampled
    to_extract: list[int]  # images stored on disk that lack features (read back and extracted)
    feature_blocks: list[Block]  # the blocks whose features count
    stale: list[Path]  # feature blocks superseded: delete them


def plan_resume(kept: np.ndarray, stored: np.ndarray, blocks: list[Block] | None) -> ResumePlan:
    """What is left, from kept [N] bool (image i is on disk: a valid PNG or in a shard), stored [N] bool (the
    run keeps image i on disk at all; --save none keeps only the grid's) and the feature blocks of the current
    weights (None: no features wanted).

    An image not on disk is sampled when the run keeps it, or when it has no features; an image on disk without
    features is read back and extracted. A feature block holding an image that is sampled again is stale
    (features are never mixed): its other images are extracted again from disk, or sampled again.
    """
    if blocks is None:
        return ResumePlan(np.flatnonzero(stored & ~kept).tolist(), [], [], [])
    valid, stale = list(blocks), []
    while True:
        has = np.zeros(kept.shape[0], bool)
        for block in valid:
            has[block.indices] = True
        to_sample = ~kept & (stored | ~has)
        drop = [block for block in valid if to_sample[block.indices].any()]
        if not drop:
            break
        stale += [block.path for block in drop]
        valid = [block for block in valid if not to_sample[block.indices].any()]
    to_extract = np.flatnonzero(kept & ~has).tolist()
    return ResumePlan(np.flatnonzero(to_sample).tolist(), to_extract, valid, stale)


class BlockWriter:
    """One rank's consecutive batches, written as blocks of `block_images`: first the image shard (the images
    with index below `keep_images_below`; `image_dir` None: none), then, after `before_features()` (e.g. the
    PNG writes finishing), the feature block (`feature_dir` None: none). Each file is atomic and carries the run's
    id `run` and its checksums; after a SIGKILL an index has features only when its image is stored."""

    def __init__(self, num_images: int, block_images: int, run: str, image_dir: Path | None,
                 feature_dir: Path | None, keep_images_below: int | None = None,
                 before_features: Callable[[], None] | None = None):
        self.num_images, self.block_images, self.run = num_images, block_images, run
        self.image_dir, self.feature_dir = image_dir, feature_dir
        self.keep_below = num_images if keep_images_below is None else keep_images_below
        self.before_features = before_features
        self._indices: list[np.ndarray] = []
        self._images: list[tuple[np.ndarray, np.ndarray]] = []  # (indices, images) kept
        self._features: list[dict[str, np.ndarray]] = []
        self.pending = 0

    def add(self, indices: Sequence[int] | np.ndarray, images: np.ndarray | None,
            features: Mapping[str, np.ndarray] | None) -> None:
        """Images uint8 [B, H, W, 3] and features (kind -> float32 [B, D]) of global `indices` [B]."""
        idx = np.asarray(indices, np.int64)
        self._indices.append(idx)
        if self.image_dir is not None and images is not None:
            keep = idx < self.keep_below
            if keep.any():
                self._images.append((idx[keep], np.ascontiguousarray(images[keep])))
        if self.feature_dir is not None and features is not None:
            self._features.append(dict(features))
        self.pending += idx.shape[0]
        if self.pending >= self.block_images:
            self.flush()

    def flush(self) -> None:
        """Write what is collected (the last, partial block at the end of a rank's share or on a stop)."""
        if not self.pending:
            return
        # taken first: a write that fails is not tried again by the flush of close(), whose error would hide it
        indices, images, features = self._indices, self._images, self._features
        self._indices, self._images, self._features, self.pending = [], [], [], 0
        if images:
            idx = np.concatenate([i for i, _ in images])
            write_block(self.image_dir / block_name(idx, self.num_images), idx,
                        {IMAGES_KEY: np.concatenate([im for _, im in images])}, self.run, IMAGES_CONTENT, IMAGE_SHARD)
        if features:
            if self.before_features is not None:
                self.before_features()
            idx = np.concatenate(indices)
            kinds = features[0]
            write_block(self.feature_dir / block_name(idx, self.num_images), idx,
                        {k: np.concatenate([f[k] for f in features]) for k in kinds}, self.run,
                        self.feature_dir.name, FEATURE_BLOCK)
