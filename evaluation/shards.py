"""A sampling run's stored blocks: uint8 image shards and Inception feature blocks, keyed by global index.

    <run>/images/<first>-<last>-<count>.npz                    arr_0 uint8 [n, H, W, 3] (NHWC), indices int64 [n]
    <run>/features-<weights id>/<first>-<last>-<count>.npz     indices int64 [n], pool [n, 2048],
                                                               spatial [n, 2023] (logits [n, 1008]), float32

A block holds one rank's consecutive batches and is named by the global sample indices it holds, never by
rank, so a run resumed on another number of processes reads it the same way. Each file is written
atomically (temporary name, then rename), the features after their images (PNGs or shard): after a SIGKILL an
index has features only when its image is stored. `plan_resume` turns what a folder holds into the work left;
`assemble_npz` copies the shards into an ADM `.npz` in index order without decoding anything.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.batches import IMAGES_KEY, LABELS_KEY, NPY_SUFFIX, RGB_CHANNELS, BatchError, NpzBatch, NpzWriter
from evaluation.inception import InceptionWeights
from launch.runtime.files import atomic_write, file_sha256

IMAGES_DIR = "images"
FEATURES_PREFIX = "features-"
INDICES_KEY = "indices"
BLOCK_SUFFIX = ".npz"
# Images per block and rank: 50,000 images make ~100 image shards + ~100 feature blocks, and a SIGKILL loses at
# most this many images per rank (a stop signal writes the partial block first).
DEFAULT_BLOCK_IMAGES = 512
FEATURES_VERSION = 1  # bump when what a feature block holds changes
WEIGHTS_ID_CHARS = 16
ASSEMBLE_CHUNK = 256  # images copied at once into the .npz
MIN_NAME_DIGITS = 6

Headers = dict[str, tuple[tuple[int, ...], np.dtype]]


@dataclass(frozen=True, eq=False)
class Block:
    """One block file and the global sample indices it holds (int64 [n], distinct)."""

    path: Path
    indices: np.ndarray


def block_name(indices: np.ndarray, num_images: int) -> str:
    """`<first>-<last>-<count>.npz`; two blocks of one folder never share an index, so never a name."""
    digits = max(MIN_NAME_DIGITS, len(str(max(0, num_images - 1))))
    return f"{int(indices[0]):0{digits}d}-{int(indices[-1]):0{digits}d}-{len(indices)}{BLOCK_SUFFIX}"


def weights_id(weights: InceptionWeights) -> str:
    """What features depend on: the content hash of the Inception weights file (and the block format)."""
    return f"v{FEATURES_VERSION}-{file_sha256(weights.path)[:WEIGHTS_ID_CHARS]}"


def features_dir(run_dir: Path, weights: str) -> Path:
    """The folder of the feature blocks extracted with the weights of identity `weights`."""
    return run_dir / f"{FEATURES_PREFIX}{weights}"


def write_block(path: Path, indices: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
    """One block file (np.savez layout, uncompressed), written atomically; FileWriteError names it."""
    with atomic_write(path) as f:
        np.savez(f, **{INDICES_KEY: np.asarray(indices, np.int64)}, **arrays)


def _headers(path: Path) -> Headers:
    """Shape and dtype of every array of an .npz, from the .npy headers only (no data read)."""
    out: Headers = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(NPY_SUFFIX):
                continue
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
            out[info.filename[: -len(NPY_SUFFIX)]] = (tuple(shape), dtype)
    return out


def _read_indices(path: Path, num_images: int, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]
                  ) -> np.ndarray | None:
    """The block's indices when it is readable and every expected array has one row per index; else None."""
    try:
        heads = _headers(path)
        with np.load(path, allow_pickle=False) as z:
            idx = z[INDICES_KEY]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    n = idx.shape[0] if idx.ndim == 1 else 0
    if n == 0 or idx.dtype != np.int64 or idx.min() < 0 or idx.max() >= num_images or np.unique(idx).size != n:
        return None
    for name, (row_shape, dtype) in expected.items():
        if heads.get(name) != ((n, *row_shape), np.dtype(dtype)):
            return None
    return idx


def scan_blocks(folder: Path, num_images: int, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]
                ) -> list[Block]:
    """The usable blocks of `folder` in name order. A damaged block (only outside interference makes one:
    writes are atomic) or one that repeats an index of an earlier block is deleted; its images are redone."""
    blocks: list[Block] = []
    seen = np.zeros(num_images, bool)
    for path in sorted(folder.glob(f"[0-9]*{BLOCK_SUFFIX}")) if folder.is_dir() else []:
        idx = _read_indices(path, num_images, expected)
        if idx is None or seen[idx].any():
            path.unlink(missing_ok=True)
            continue
        seen[idx] = True
        blocks.append(Block(path, idx))
    return blocks


def scan_features(folder: Path, num_images: int, dims: Mapping[str, int]) -> list[Block]:
    """The feature blocks of `folder` holding every kind of `dims` (kind -> width) as float32 rows."""
    return scan_blocks(folder, num_images, {kind: ((d,), np.dtype(np.float32)) for kind, d in dims.items()})


def load_features(blocks: Iterable[Block], kinds: Iterable[str]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(indices, kind -> rows) of each block in turn."""
    kinds = list(kinds)
    for block in blocks:
        try:
            with np.load(block.path, allow_pickle=False) as z:
                yield z[INDICES_KEY], {kind: z[kind] for kind in kinds}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise BatchError(f"cannot read feature block {block.path}: {exc}; rerun to redo it") from None


class ImageShards:
    """The image shards of a run folder: which indices they hold, and those images by index (memory-mapped)."""

    def __init__(self, blocks: list[Block], num_images: int, image_size: int):
        self.blocks, self.num_images = blocks, num_images
        self.shape = (image_size, image_size, RGB_CHANNELS)
        self.shard = np.full(num_images, -1, np.int64)  # [N]: which block holds image i (-1: none)
        self.row = np.zeros(num_images, np.int64)  # [N]: its row there
        for s, block in enumerate(blocks):
            self.shard[block.indices] = s
            self.row[block.indices] = np.arange(block.indices.shape[0])
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def scan(cls, run_dir: Path, num_images: int, image_size: int) -> ImageShards:
        expected = {IMAGES_KEY: ((image_size, image_size, RGB_CHANNELS), np.dtype(np.uint8))}
        return cls(scan_blocks(run_dir / IMAGES_DIR, num_images, expected), num_images, image_size)

    @property
    def kept(self) -> np.ndarray:
        """bool [N]: image i is in a shard."""
        return self.shard >= 0

    def _map(self, s: int) -> np.ndarray:
        if s not in self._maps:
            self._maps[s] = NpzBatch(self.blocks[s].path).images_memmap()
        return self._maps[s]

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images of the global `indices`, uint8 [k, H, W, 3], in that order."""
        idx = np.asarray(indices, np.int64)
        shard = self.shard[idx]
        if (shard < 0).any():
            raise BatchError(f"image {int(idx[shard < 0][0])} is in no image shard; rerun the sampler to finish "
                             "the run")
        out = np.empty((idx.shape[0], *self.shape), np.uint8)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._map(int(s))[self.row[idx[sel]]]
        return out


def assemble_npz(shards: ImageShards, out: Path, labels: np.ndarray | None = None) -> Path:
    """Copy every image 0..N-1 from the shards into the ADM batch `out` (arr_0, arr_1 = labels), streamed in
    index order, nothing decoded; written under a temporary name and renamed."""
    n = shards.num_images
    missing = np.flatnonzero(~shards.kept)
    if missing.size:
        raise BatchError(f"the image shards lack {missing.size} of {n} images (first: {missing[0]}); rerun the "
                         "sampler to finish them")
    extras = {LABELS_KEY: np.asarray(labels, dtype=np.int64)} if labels is not None else None
    with NpzWriter(out, n, shards.shape[0], shards.shape[1]) as writer:
        for a in range(0, n, ASSEMBLE_CHUNK):
            writer.write(shards.read(np.arange(a, min(n, a + ASSEMBLE_CHUNK))))
        return writer.close(extras)


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
    PNG writes finishing), the feature block (`feature_dir` None: none). Each file is atomic."""

    def __init__(self, num_images: int, block_images: int, image_dir: Path | None, feature_dir: Path | None,
                 keep_images_below: int | None = None, before_features: Callable[[], None] | None = None):
        self.num_images, self.block_images = num_images, block_images
        self.image_dir, self.feature_dir = image_dir, feature_dir
        self.keep_below = num_images if keep_images_below is None else keep_images_below
        self.before_features = before_features
        self._indices: list[np.ndarray] = []
        self._images: list[tuple[np.ndarray, np.ndarray]] = []  # (indices, images) kept
        self._features: list[dict[str, np.ndarray]] = []
        self.pending = 0

    def add(self, indices: Sequence[int] | np.ndarray, images: np.ndarray | None,
            features: Mapping[str, torch.Tensor] | None) -> None:
        """Images uint8 [B, H, W, 3] and features (kind -> [B, D] on any device) of global `indices` [B]."""
        idx = np.asarray(indices, np.int64)
        self._indices.append(idx)
        if self.image_dir is not None and images is not None:
            keep = idx < self.keep_below
            if keep.any():
                self._images.append((idx[keep], np.ascontiguousarray(images[keep])))
        if self.feature_dir is not None and features is not None:
            self._features.append({k: v.detach().to("cpu", torch.float32).numpy() for k, v in features.items()})
        self.pending += idx.shape[0]
        if self.pending >= self.block_images:
            self.flush()

    def flush(self) -> None:
        """Write what is collected (the last, partial block at the end of a rank's share or on a stop)."""
        if not self.pending:
            return
        if self._images:
            idx = np.concatenate([i for i, _ in self._images])
            write_block(self.image_dir / block_name(idx, self.num_images), idx,
                        {IMAGES_KEY: np.concatenate([im for _, im in self._images])})
        if self._features:
            if self.before_features is not None:
                self.before_features()
            idx = np.concatenate(self._indices)
            kinds = self._features[0]
            write_block(self.feature_dir / block_name(idx, self.num_images), idx,
                        {k: np.concatenate([f[k] for f in self._features]) for k in kinds})
        self._indices, self._images, self._features, self.pending = [], [], [], 0
