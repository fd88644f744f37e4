"""One block file of a run folder: rows of a few arrays keyed by global sample index, with the identity of the
run that wrote it and a checksum of every array, so a run reads back only what it wrote itself.

    <block>.npz   indices   int64 [n], distinct global sample indices
                  <arrays>  one row per index (image shards: arr_0 uint8 [n, H, W, 3]; feature blocks: float32
                            [n, D] per feature kind)
                  origin    uint8: UTF-8 JSON {"format", "run", "content", "crc32": {array name: CRC-32 of its
                            bytes}}: "run" is the run identity's id, "content" what the block holds

Written atomically (temporary name, then rename), uncompressed (np.savez), so a block's image rows can be
memory-mapped. `check_block` looks at the headers and the origin only; `load_block` reads every array and
compares its CRC-32, so a block copied in from another run, damaged on disk or truncated never reaches a result.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.runtime.files import atomic_write
from launch.runtime.npzfile import read_headers

INDICES_KEY = "indices"
ORIGIN_KEY = "origin"
BLOCK_FORMAT = 2  # format 1 (no origin, no checksums) came before blocks were checked
READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)

RowSpec = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # array name -> (row shape, dtype)


@dataclass(frozen=True, eq=False)
class Block:
    """One block file and the global sample indices it holds (int64 [n], distinct)."""

    path: Path
    indices: np.ndarray


def crc32(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order)."""
    return zlib.crc32(np.ascontiguousarray(array).data)


def write_block(path: Path, indices: np.ndarray, arrays: Mapping[str, np.ndarray], run: str, content: str,
                what: str = "block") -> None:
    """Write one block atomically with its origin and checksums; FileWriteError names it (`what`: e.g. image
    shard, feature block)."""
    members = {INDICES_KEY: np.asarray(indices, np.int64), **{k: np.ascontiguousarray(v) for k, v in arrays.items()}}
    origin = {"format": BLOCK_FORMAT, "run": run, "content": content,
              "crc32": {name: crc32(array) for name, array in members.items()}}
    encoded = np.frombuffer(json.dumps(origin, sort_keys=True).encode(), np.uint8)
    with atomic_write(path, what=what) as f:
        np.savez(f, **members, **{ORIGIN_KEY: encoded})


def read_origin(path: Path) -> dict:
    """The block's origin record (small read); ValueError when it has none or it is not one."""
    with np.load(path, allow_pickle=False) as z:
        if ORIGIN_KEY not in z.files:
            raise ValueError("no origin record (written by a version that did not check blocks)")
        origin = json.loads(z[ORIGIN_KEY].tobytes().decode())
    if not isinstance(origin, dict) or origin.get("format") != BLOCK_FORMAT:
        raise ValueError(f"origin record of another format ({origin!r:.80})")
    return origin


def check_block(path: Path, num_images: int, rows: RowSpec, run: str, content: str) -> Block | str:
    """The block, or why it cannot be used: unreadable, another run's or another content, indices out of range
    or repeated, an array missing or of the wrong row shape. Reads headers, indices and origin only."""
    try:
        heads = read_headers(path)
        origin = read_origin(path)
        with np.load(path, allow_pickle=False) as z:
            idx = z[INDICES_KEY]
    except READ_ERRORS as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"
    if origin.get("run") != run:
        return f"written by another run ({origin.get('run')}; this run is {run})"
    if origin.get("content") != content:
        return f"holds {origin.get('content')}, not {content}"
    n = idx.shape[0] if idx.ndim == 1 else 0
    if n == 0 or idx.dtype != np.int64 or idx.min() < 0 or idx.max() >= num_images or np.unique(idx).size != n:
        return f"its indices are not distinct sample indices below {num_images}"
    for name, (row_shape, dtype) in rows.items():
        shape, got_dtype, fortran = heads.get(name, ((), None, False))
        if shape != (n, *row_shape) or got_dtype != np.dtype(dtype) or fortran:
            return f"array {name} is {got_dtype} {shape}, expected {np.dtype(dtype)} {(n, *row_shape)}"
    return Block(path, idx)


def load_block(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays `names` (and the indices) of a block, each checked against its CRC-32; ValueError (naming the
    array) when one does not match, OSError and the like when the file cannot be read."""
    origin = read_origin(path)
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for name in (INDICES_KEY, *names):
            array = z[name]
            if crc32(array) != origin["crc32"].get(name):
                raise ValueError(f"array {name} does not match its checksum (damaged on disk)")
            out[name] = array
    return out


def verify_block(path: Path, names: Sequence[str]) -> str | None:
    """None when every array `names` reads back and matches its checksum, else why not."""
    try:
        load_block(path, names)
    except READ_ERRORS as exc:
        return f"damaged ({type(exc).__name__}: {str(exc)[:120]})"
    return None
