"""ADM image batches: streamed `.npz` reading and writing, PNG writing and folder packing.

An ADM batch is an uncompressed `.npz` (np.savez layout: zip members `arr_0.npy`, ...) whose
`arr_0` is uint8 [N, H, W, 3] (NHWC); sample batches may add `arr_1` (labels) and reference
batches `mu`, `sigma`, `mu_s`, `sigma_s`. Nothing here holds a whole batch in memory.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import warnings
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from launch.runtime.errors import UserError
from launch.runtime.files import atomic_write, available_cpus
from launch.runtime.npzfile import NPY_SUFFIX, NpzWriter, member_data_offset, read_header
from launch.runtime.rundir import (
    GRID_NAME,
    IMAGES_KEY,
    LABELS_KEY,
    MANIFEST_NAME,
    PNG_SUFFIX,
    RGB_CHANNELS,
    Manifest,
    RunDirError,
    index_filename,
)

MAX_WORKERS = 8  # decoding beyond this is limited by the disk, not the CPUs
POOL_MIN_IMAGES = 1024  # fewer PNGs decode faster here than a spawned worker (which imports torch) starts
DEFAULT_WORKERS = min(MAX_WORKERS, available_cpus())
INDEX_PNG = re.compile(r"^\d{6,}\.png$")
STATISTICS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"),  # ADM reference batches
                   "dinov2": ("mu_dinov2", "sigma_dinov2")}  # FD_DINOv2, EDM2's default (torch) resize
DINOV2_PIL_KEYS = ("mu_dinov2_pil", "sigma_dinov2_pil")  # FD_DINOv2 statistics of images resized by PIL


class BatchError(UserError):
    """A batch file or folder that cannot be used."""


# --------------------------------------------------------------------------------------------- reading


class ImageBatch:
    """A readable batch of uint8 NHWC images (a .npz or a folder of PNGs)."""

    path: Path
    num_images: int
    height: int
    width: int
    has_images: bool = True  # False: a file of statistics only (num_images 0)

    def iter_chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return False

    def array(self, name: str) -> np.ndarray:
        raise BatchError(f"{self.path} has no array {name!r}")

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.num_images if stop is None else min(stop, self.num_images)
        return max(0, start), stop


def _check_layout(path: Path, shape: tuple[int, ...], fortran: bool, dtype: np.dtype) -> None:
    """arr_0 must be C-ordered uint8 [N, H, W, 3]."""
    if dtype != np.uint8:
        raise BatchError(f"{path}: arr_0 has dtype {dtype}, expected uint8 images (0..255)")
    if len(shape) != 4:
        raise BatchError(f"{path}: arr_0 has shape {shape}, expected [N, H, W, 3] (NHWC)")
    if shape[-1] != RGB_CHANNELS:
        if shape[1] == RGB_CHANNELS:
            raise BatchError(f"{path}: arr_0 has shape {shape}, which looks like NCHW; "
                             "ADM batches are NHWC: save x.transpose(0, 2, 3, 1)")
        raise BatchError(f"{path}: arr_0 has {shape[-1]} channels, expected 3 (RGB, NHWC)")
    if fortran:
        raise BatchError(f"{path}: arr_0 is stored in Fortran order; save it C-contiguous")
    if min(shape[1:3]) < 1:
        raise BatchError(f"{path}: arr_0 has shape {shape}: images of {shape[1]}x{shape[2]} pixels hold nothing")


class NpzBatch(ImageBatch):
    """`arr_0` read in chunks straight from the zip member (no full load, no memory map).

    A file without `arr_0` but with statistics (`mu` and `sigma`, and/or `mu_s` and `sigma_s`) opens as a
    batch of no images (`has_images` False): enough for FID and sFID against it.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
            names = {n[: -len(NPY_SUFFIX)]: n for n in self._zip.namelist() if n.endswith(NPY_SUFFIX)}
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BatchError(f"{path} is not a readable .npz (truncated or corrupt?): {exc}") from None
        self._members = names
        if IMAGES_KEY in names:
            self._open_images(self._zip.getinfo(names[IMAGES_KEY]))
        elif any(all(key in names for key in pair) for pair in (*STATISTICS_KEYS.values(), DINOV2_PIL_KEYS)):
            self.has_images = False
            self.num_images, self.height, self.width = 0, 0, 0
        else:
            raise BatchError(f"{path} has no {IMAGES_KEY} (arrays: {', '.join(sorted(names)) or 'none'}); "
                             "an ADM batch stores its images as arr_0")

    def _open_images(self, info: zipfile.ZipInfo) -> None:
        path = self.path
        self._stored = info.compress_type == zipfile.ZIP_STORED
        try:
            with self._zip.open(info) as f:
                (shape, dtype, fortran), header_len = read_header(f)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise BatchError(f"{path}: arr_0 is not a valid .npy array: {exc}") from None
        _check_layout(path, tuple(shape), fortran, dtype)
        self.num_images, self.height, self.width = int(shape[0]), int(shape[1]), int(shape[2])
        self._image_bytes = self.height * self.width * RGB_CHANNELS
        self._header_len = header_len
        expected = header_len + self.num_images * self._image_bytes
        if info.file_size < expected:
            raise BatchError(f"{path} is truncated: arr_0 holds {info.file_size} bytes, "
                             f"its header promises {expected}")
        if self._stored:
            self._data_offset = member_data_offset(self.path, info) + header_len
            if os.path.getsize(path) < self._data_offset + self.num_images * self._image_bytes:
                raise BatchError(f"{path} is truncated: the file ends before arr_0 does")

    def iter_chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        if not self.has_images:
            raise BatchError(f"{self.path} holds statistics only, no {IMAGES_KEY}")
        start, stop = self._range(start, stop)
        shape = (self.height, self.width, RGB_CHANNELS)
        if self._stored:
            with open(self.path, "rb") as f:
                f.seek(self._data_offset + start * self._image_bytes)
                for a in range(start, stop, size):
                    n = min(size, stop - a)
                    buf = np.empty((n, *shape), np.uint8)
                    if f.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                        raise BatchError(f"{self.path} is truncated: could not read images {a}..{a + n - 1}")
                    yield buf
            return
        # Compressed member: read forward through the decompressor.
        with self._zip.open(self._members[IMAGES_KEY]) as f:
            f.read(self._header_len)
            skip = start * self._image_bytes
            while skip > 0:
                skip -= len(f.read(min(skip, 1 << 24)))
            for a in range(start, stop, size):
                n = min(size, stop - a)
                data = f.read(n * self._image_bytes)
                if len(data) != n * self._image_bytes:
                    raise BatchError(f"{self.path} is truncated: could not read images {a}..{a + n - 1}")
                yield np.frombuffer(data, np.uint8).reshape(n, *shape)

    def images_memmap(self) -> np.ndarray:
        """arr_0 as a read-only memory map [N, H, W, 3] (random access without reading the rest of the file);
        only for an uncompressed member (np.savez, NpzWriter)."""
        if not (self.has_images and self._stored):
            raise BatchError(f"{self.path}: arr_0 is compressed or absent; cannot map it")
        return np.memmap(self.path, np.uint8, "r", offset=self._data_offset,
                         shape=(self.num_images, self.height, self.width, RGB_CHANNELS))

    def has(self, name: str) -> bool:
        return name in self._members

    def array(self, name: str) -> np.ndarray:
        if name not in self._members:
            raise BatchError(f"{self.path} has no array {name!r}")
        try:
            with self._zip.open(self._members[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise BatchError(f"{self.path}: cannot read {name}: {exc}") from None


def _manifest_count(folder: Path) -> tuple[int, int | None] | None:
    """(num_fid_samples, image_size) of the sampler's manifest.json in `folder`, None when there is none."""
    path = folder / MANIFEST_NAME
    try:
        manifest = Manifest.read(folder)
    except RunDirError as exc:
        raise BatchError(str(exc)) from None
    if manifest is None:
        return None
    count, size = manifest.identity.get("num_fid_samples"), manifest.identity.get("image_size")
    if not isinstance(count, int) or count < 1:
        raise BatchError(f"{path}: identity.num_fid_samples is {count!r}, expected a positive integer")
    return count, size if isinstance(size, int) else None


def _names(files: list[Path], shown: int = 3) -> str:
    listed = ", ".join(f.name for f in files[:shown])
    return listed + (f", ... ({len(files)} in all)" if len(files) > shown else "")


def folder_files(folder: Path) -> tuple[list[Path], int | None]:
    """The images a folder batch holds, and the side its manifest promises (None without one).

    With the sampler's manifest.json: exactly `{index:06d}.png` for index 0..num_fid_samples-1 (all present).
    Else the index-named PNGs when there are any, else every PNG, in sorted name order. PNGs left out (other
    than the sampler's grid.png) and index names that are not 0..N-1 are reported in a warning.
    """
    pngs = sorted(p for p in folder.iterdir() if p.suffix.lower() == PNG_SUFFIX and p.name[0] != ".")
    indexed = [p for p in pngs if INDEX_PNG.match(p.name)]
    manifest = _manifest_count(folder)
    if manifest is not None:
        count, size = manifest
        files = [folder / index_filename(i, count) for i in range(count)]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise BatchError(f"{folder} lacks {len(missing)} of the {count} images its {MANIFEST_NAME} lists "
                             f"(first: {missing[0].name}); rerun the sampler to finish them")
        chosen = set(files)
        ignored = [p for p in pngs if p not in chosen and p.name != GRID_NAME]
        if ignored:
            warnings.warn(f"{folder}: reading the {count} images {files[0].name}..{files[-1].name} that its "
                          f"{MANIFEST_NAME} lists (identity.num_fid_samples); ignoring {_names(ignored)}", stacklevel=3)
        return files, size
    if not indexed:
        return pngs, None
    ignored = [p for p in pngs if not INDEX_PNG.match(p.name) and p.name != GRID_NAME]
    numbers = [int(p.name[: -len(PNG_SUFFIX)]) for p in indexed]
    if numbers != list(range(len(numbers))) or ignored:
        gap = next((i for i, n in enumerate(numbers) if n != i), None)
        why = "" if gap is None else f", which are not 0..{len(numbers) - 1} (first unexpected: {indexed[gap].name})"
        skipped = f"; ignoring {_names(ignored)}" if ignored else ""
        warnings.warn(f"{folder}: no {MANIFEST_NAME}; reading its {len(indexed)} index-named PNGs{why}{skipped}",
                      stacklevel=3)
    return indexed, None


def _png_size(file: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, without decoding the pixels."""
    try:
        with Image.open(file) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise BatchError(f"cannot decode {file}: {exc}") from None


class PngFolder(ImageBatch):
    """A folder of same-sized PNGs (see `folder_files`); every file's size is checked when it is opened."""

    def __init__(self, path: Path):
        self.path = path
        self.files, promised = folder_files(path)
        if not self.files:
            raise BatchError(f"{path} contains no .png images")
        self.num_images = len(self.files)
        with ThreadPoolExecutor(DEFAULT_WORKERS) as pool:
            sizes = list(pool.map(_png_size, self.files))
        self.width, self.height = sizes[0]
        odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
        if odd is not None:
            w, h = sizes[odd]
            raise BatchError(f"{self.files[odd]} is {w}x{h} but {self.files[0].name} is {self.width}x{self.height}; "
                             "a batch holds images of one size")
        if promised is not None and (self.width, self.height) != (promised, promised):
            raise BatchError(f"{path}: the images are {self.width}x{self.height} but its {MANIFEST_NAME} says "
                             f"image_size {promised}")

    def _load(self, file: Path) -> np.ndarray:
        try:
            with Image.open(file) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise BatchError(f"cannot decode {file}: {exc}") from None
        if arr.shape[:2] != (self.height, self.width):
            raise BatchError(f"{file} is {arr.shape[1]}x{arr.shape[0]} but the folder's images are "
                             f"{self.width}x{self.height}")
        return arr

    def iter_chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        start, stop = self._range(start, stop)
        with ThreadPoolExecutor(DEFAULT_WORKERS) as pool:
            for a in range(start, stop, size):
                yield np.stack(list(pool.map(self._load, self.files[a: min(stop, a + size)])))


def open_batch(path: str | os.PathLike) -> ImageBatch:
    """Open an ADM `.npz` batch or a folder of PNGs; raises BatchError with one line."""
    p = Path(path)
    if not p.exists():
        raise BatchError(f"{p} does not exist")
    if p.is_dir():
        return PngFolder(p)
    return NpzBatch(p)


# --------------------------------------------------------------------------------------------- writing


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode `image` (uint8 HWC) to `path` via a temporary name and an atomic rename (FileWriteError names it)."""
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format="PNG")


class PngWriter:
    """Encode PNGs on background threads (zlib releases the GIL) while the model runs.

    At most `max_pending` images wait in memory; `close()` waits for all and re-raises
    the first error as a one-line BatchError.
    """

    def __init__(self, workers: int = DEFAULT_WORKERS, max_pending: int = 256):
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="png")
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def submit(self, path: Path, image: np.ndarray) -> None:
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write_png, path, image))
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def wait(self) -> None:
        """Finish every write in flight; raise the first error."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im)
    except (OSError, SyntaxError) as exc:
        raise BatchError(f"cannot decode {path}: {exc}") from None


def png_is_valid(path: Path) -> bool:
    """True when `path` exists and decodes completely (a truncated PNG fails)."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def pack_files(files: Iterable[Path], out: str | os.PathLike, num_images: int,
               extras: Mapping[str, np.ndarray] | None = None, workers: int = DEFAULT_WORKERS,
               chunk: int = 64) -> Path:
    """Decode PNGs in parallel worker processes, in order, and stream them into `out` (an ADM .npz).

    Memory stays at about `chunk * 2 * workers` images whatever `num_images` is. Below POOL_MIN_IMAGES images
    they decode on one thread of this process: a worker process takes seconds to start.
    """
    files = list(files)
    if len(files) != num_images:
        raise BatchError(f"{out}: {len(files)} PNGs given for {num_images} images")
    if not files:
        raise BatchError(f"{out}: no images to pack")
    first = _read_png(files[0])
    height, width = first.shape[:2]
    if num_images < POOL_MIN_IMAGES:
        workers = 1
    with _decode_pool(workers) as pool, NpzWriter(out, IMAGES_KEY, num_images, (height, width, RGB_CHANNELS)) as writer:
        lookahead: deque[Future] = deque()
        starts = iter(range(0, num_images, chunk))

        def submit_next() -> None:
            a = next(starts, None)
            if a is not None:
                lookahead.append(pool.submit(_read_chunk, files[a: a + chunk], height, width))

        for _ in range(2 * max(1, workers)):
            submit_next()
        while lookahead:
            writer.write(lookahead.popleft().result())
            submit_next()
        return writer.close(extras)


def _decode_pool(workers: int) -> Executor:
    """PIL's PNG decoder holds the GIL, so decoding scales with processes, not threads.

    Workers are spawned (not forked): the parent may hold torch's thread pools.
    """
    if workers <= 1:
        return ThreadPoolExecutor(1)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def read_pngs(files: list[Path], height: int, width: int) -> np.ndarray:
    """Decode PNGs of one size into uint8 [len(files), height, width, 3] (RGB); BatchError naming a bad file."""
    return _read_chunk(files, height, width)


def _read_chunk(files: list[Path], height: int, width: int) -> np.ndarray:
    out = np.empty((len(files), height, width, RGB_CHANNELS), np.uint8)
    for i, f in enumerate(files):
        img = _read_png(f)
        if img.shape != out.shape[1:]:
            raise BatchError(f"{f} is {img.shape[1]}x{img.shape[0]}, expected {width}x{height}")
        out[i] = img
    return out


def pack_folder(folder: str | os.PathLike, out: str | os.PathLike, num_images: int,
                labels: np.ndarray | None = None, workers: int = DEFAULT_WORKERS) -> Path:
    """Pack `{index:06d}.png` for index 0..num_images-1 of `folder` into an ADM .npz (`arr_1` = labels)."""
    folder = Path(folder)
    files = [folder / index_filename(i, num_images) for i in range(num_images)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise BatchError(f"{folder} lacks {len(missing)} of {num_images} PNGs (first: {missing[0].name}); "
                         "rerun the sampler to finish them")
    extras = {LABELS_KEY: np.asarray(labels, dtype=np.int64)} if labels is not None else None
    return pack_files(files, out, num_images, extras, workers)


