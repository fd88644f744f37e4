"""An ADM reference batch from images (a folder or an .npz): ADM's preprocessing, streamed statistics, seeded arr_0.

The source is a folder (images found recursively: .jpg, .jpeg, .png, .gif, as ADM's loader, in sorted path
order) or an .npz whose arr_0 holds uint8 NHWC images of any size (read in chunks, memory-mapped when stored
uncompressed, so a 1.2M-image file never sits in memory). Every image goes through ADM's preprocessing
(`center_crop_arr`: halve with BOX while the short side is >= 2x the target, BICUBIC so the short side equals
the target, centre crop) and then through the networks; `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s`
(spatial), and with DINOv2 `mu_dinov2`, `sigma_dinov2` (`_pil` for the PIL resize), cover all images, streamed.
`arr_0` holds `num_images` of them for precision/recall: a seeded uniform choice without replacement
(`numpy.random.default_rng(seed).choice`), kept in source order, so the same source and seed always give the
same file; all images when the source holds no more than that. The same images as PNGs in a folder or in an
.npz give the same reference. Under torchrun the images are split over ranks; rank 0 writes the file.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.batches import IMAGES_KEY, RGB_CHANNELS, BatchError, NpzBatch, NpzWriter
from evaluation.errors import EvaluationError
from evaluation.features import DINOV2, FeatureAccumulator, FeatureExtractor, extract_chunks
from evaluation.inputs import statistics_keys
from evaluation.networks import dinov2_resize_of
from evaluation.reference_cache import (
    DEFAULT_CACHE_DIR,
    FRECHET_KINDS,
    MANIFOLD_KINDS,
    cache_networks,
    reference_stats,
)
from evaluation.statistics import MIN_COV_IMAGES
from launch.runtime import dist
from launch.runtime.files import available_cpus
from launch.runtime.images import center_crop
from launch.runtime.partition import share_bounds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")  # ADM's _list_image_files_recursively
NPZ_SUFFIX = ".npz"
DEFAULT_NUM_IMAGES = 10_000  # ADM's ImageNet reference batches hold 10k images in arr_0
DEFAULT_SEED = 0
MAX_DECODE_WORKERS = 8
DECODE_WORKERS = min(MAX_DECODE_WORKERS, available_cpus())
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")  # Inception's, as ADM's reference batches hold them


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in sorted path order."""
    if not folder.is_dir():
        raise EvaluationError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise EvaluationError(f"{folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


class Decoder:
    """ADM's preprocessing of image files, counting the images it had to upsample."""

    def __init__(self, size: int):
        self.size = size
        self.upsampled = 0  # images whose short side was below `size`
        self._lock = threading.Lock()  # `load` runs on worker threads

    def prepare(self, image: Image.Image) -> np.ndarray:
        """ADM's preprocessing of one image, counted when it has to be upsampled."""
        if min(image.size) < self.size:
            with self._lock:
                self.upsampled += 1
        return center_crop(image, self.size)

    def load(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                return self.prepare(im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise EvaluationError(f"cannot decode {path}: {exc}") from None

    def from_array(self, image: np.ndarray) -> np.ndarray:
        return self.prepare(Image.fromarray(image, "RGB"))

    def chunks(self, files: list[Path], chunk: int) -> Iterator[np.ndarray]:
        """Preprocessed images in order, `chunk` at a time, decoded on worker threads."""
        with ThreadPoolExecutor(DECODE_WORKERS) as pool:
            for a in range(0, len(files), chunk):
                yield np.stack(list(pool.map(self.load, files[a: a + chunk])))

    def array_chunks(self, raw: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """Each uint8 NHWC chunk of `raw` preprocessed, on worker threads (PIL's resize releases the GIL)."""
        with ThreadPoolExecutor(DECODE_WORKERS) as pool:
            for chunk in raw:
                yield np.stack(list(pool.map(self.from_array, chunk)))


class ImageSource:
    """The images of a reference, by index 0..count-1: a folder's files or an .npz's arr_0."""

    count: int
    label: str

    def chunks(self, decoder: Decoder, start: int, stop: int, chunk: int) -> Iterator[np.ndarray]:
        """Images start..stop-1, preprocessed, `chunk` at a time."""
        raise NotImplementedError

    def take(self, decoder: Decoder, indices: Sequence[int], chunk: int) -> Iterator[np.ndarray]:
        """The images of sorted `indices`, preprocessed, in order."""
        raise NotImplementedError


class FolderSource(ImageSource):
    def __init__(self, folder: Path):
        self.files, self.label = list_images(folder), str(folder)
        self.count = len(self.files)

    def chunks(self, decoder: Decoder, start: int, stop: int, chunk: int) -> Iterator[np.ndarray]:
        return decoder.chunks(self.files[start:stop], chunk)

    def take(self, decoder: Decoder, indices: Sequence[int], chunk: int) -> Iterator[np.ndarray]:
        return decoder.chunks([self.files[i] for i in indices], chunk)


class NpzSource(ImageSource):
    """arr_0 of an .npz (uint8 NHWC, any size): read forward in chunks; the chosen images of other ranks'
    shares by index from the memory map (stored arr_0) or read forward (compressed)."""

    def __init__(self, path: Path):
        self.batch, self.label = NpzBatch(path), str(path)
        if not self.batch.has_images:
            raise EvaluationError(f"{path} holds no images ({IMAGES_KEY}); pass a folder of images or an .npz "
                                  f"whose {IMAGES_KEY} holds uint8 [N, H, W, 3] images")
        self.count = self.batch.num_images
        try:
            self._map: np.ndarray | None = self.batch.images_memmap()
        except BatchError:  # a compressed arr_0: read forward instead
            self._map = None

    def chunks(self, decoder: Decoder, start: int, stop: int, chunk: int) -> Iterator[np.ndarray]:
        # Read into fresh buffers, not through the map: memory stays at a few chunks (mapped pages would count).
        return decoder.array_chunks(self.batch.iter_chunks(chunk, start, stop))

    def take(self, decoder: Decoder, indices: Sequence[int], chunk: int) -> Iterator[np.ndarray]:
        idx = np.asarray(indices, np.int64)
        if self._map is not None:
            raw = (self._map[idx[a: a + chunk]] for a in range(0, idx.shape[0], chunk))
        else:
            raw = self._pick(idx, chunk)
        return decoder.array_chunks(raw)

    def _pick(self, idx: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        """The rows `idx` of a compressed arr_0, read forward from the first of them."""
        if not idx.shape[0]:
            return
        start = int(idx[0])
        for raw in self.batch.iter_chunks(chunk, start):
            rows = idx[(idx >= start) & (idx < start + raw.shape[0])] - start
            if rows.shape[0]:
                yield raw[rows]
            start += raw.shape[0]


def open_source(path: Path) -> ImageSource:
    """A folder of images or an .npz of images; one line naming `path` otherwise."""
    if path.is_dir():
        return FolderSource(path)
    if path.is_file() and path.suffix.lower() == NPZ_SUFFIX:
        return NpzSource(path)
    raise EvaluationError(f"{path} is not a folder of images or an .npz batch ({IMAGES_KEY} uint8 NHWC)")


def choose_subset(total: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of the images stored in arr_0."""
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def warn_upsampled(decoder: Decoder, total: int) -> None:
    """One warning (rank 0) with the number of images, over all ranks, smaller than the target size."""
    (count,) = dist.sum_over_ranks([float(decoder.upsampled)])
    if count and dist.is_main():
        warnings.warn(f"{int(count)} of {total} images have a short side below --image-size {decoder.size} and "
                      "were upsampled (bicubic): their statistics describe blurred images", stacklevel=2)


def file_statistics(stats: dict[str, np.ndarray], extractor: FeatureExtractor) -> dict[str, np.ndarray]:
    """The statistics a reference file stores: ADM's four, and DINOv2's under its resize mode's names."""
    out = {k: stats[k] for k in STATISTICS if k in stats}
    if DINOV2 in extractor.feature_dims:
        mu, sigma = statistics_keys(DINOV2)  # the cache's names
        mu_key, sigma_key = statistics_keys(DINOV2, dinov2_resize_of(extractor))
        out[mu_key], out[sigma_key] = stats[mu], stats[sigma]
    return out


def build_reference(source: str | os.PathLike, image_size: int, out: str | os.PathLike,
                    extractor: FeatureExtractor, num_images: int = DEFAULT_NUM_IMAGES,
                    seed: int = DEFAULT_SEED, chunk_size: int | None = None,
                    cache_dir: Path | None = DEFAULT_CACHE_DIR) -> Path | None:
    """Write an ADM reference batch from a folder or an .npz (`source`); returns its path on rank 0 (None on
    the others). A collective.

    When arr_0 holds every image, its statistics and features go into the evaluator's cache (`cache_dir`), so
    the first evaluation against the new file needs no pass over it.
    """
    images = open_source(Path(source))
    total = images.count
    if total < MIN_COV_IMAGES:
        raise EvaluationError(f"{source} holds {total} image; a reference needs at least {MIN_COV_IMAGES}")
    chunk_size = chunk_size or extractor.batch_size
    rows = share_bounds(total, dist.rank(), dist.world_size())
    subset = choose_subset(total, num_images, seed)
    writer = (NpzWriter(out, IMAGES_KEY, len(subset), (image_size, image_size, RGB_CHANNELS)) if dist.is_main()
              else None)
    chosen = set(subset.tolist())
    decoder = Decoder(image_size)

    def own_chunks() -> Iterator[np.ndarray]:
        # Rank 0's shard comes first in source order, so its chosen images are written as they pass.
        index = rows[0]
        for chunk in images.chunks(decoder, rows[0], rows[1], chunk_size):
            if writer is not None:
                keep = [i for i in range(chunk.shape[0]) if index + i in chosen]
                if keep:
                    writer.write(chunk[keep])
            index += chunk.shape[0]
            yield chunk

    try:
        seed_cache = cache_dir is not None and len(subset) == total
        dims = extractor.feature_dims
        accumulator = FeatureAccumulator(extractor, total, stats=[k for k in dims if k in FRECHET_KINDS],
                                         inception_score=False,
                                         keep=[k for k in dims if k in MANIFOLD_KINDS] if seed_cache else ())
        extract_chunks(own_chunks(), rows, accumulator, label=f"reference {images.label}")
        got = accumulator.reduce()
        warn_upsampled(decoder, total)
        if writer is None:
            return None
        rest = [int(i) for i in subset if i >= rows[1]]  # chosen images of the other ranks' shards
        for chunk in images.take(Decoder(image_size), rest, chunk_size):
            writer.write(chunk)
        stats = reference_stats(got)
        path = writer.close(file_statistics(stats, extractor))
        if seed_cache:
            cache_networks(cache_dir, path, extractor, stats)
        return path
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
