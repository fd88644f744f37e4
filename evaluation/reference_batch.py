"""An ADM reference batch from an image folder: ADM's preprocessing, streamed statistics, a seeded arr_0.

Every image (found recursively: .jpg, .jpeg, .png, .gif, as ADM's loader) goes through ADM's preprocessing
(`center_crop_arr`: halve with BOX while the short side is >= 2x the target, BICUBIC so the short side equals
the target, centre crop) and then through Inception; `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial)
cover all images, streamed. `arr_0` holds `num_images` of them for precision/recall: a seeded uniform
choice without replacement (`numpy.random.default_rng(seed).choice`), kept in file order, so the same folder
and seed always give the same file; all images when the folder holds no more than that.
Under torchrun the images are split over ranks; rank 0 writes the file.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.batches import NpzWriter
from evaluation.errors import EvaluationError
from evaluation.features import POOL, FeatureAccumulator, FeatureExtractor, extract_chunks
from evaluation.reference_cache import DEFAULT_CACHE_DIR, cache_reference, reference_stats
from evaluation.statistics import MIN_COV_IMAGES
from launch.runtime import dist
from launch.runtime.files import available_cpus
from launch.runtime.images import center_crop
from launch.runtime.partition import share_bounds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")  # ADM's _list_image_files_recursively
DEFAULT_NUM_IMAGES = 10_000  # ADM's ImageNet reference batches hold 10k images in arr_0
DEFAULT_SEED = 0
MAX_DECODE_WORKERS = 8
DECODE_WORKERS = min(MAX_DECODE_WORKERS, available_cpus())
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")


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

    def load(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                if min(im.size) < self.size:
                    with self._lock:
                        self.upsampled += 1
                return center_crop(im, self.size)
        except (OSError, SyntaxError, ValueError) as exc:
            raise EvaluationError(f"cannot decode {path}: {exc}") from None

    def chunks(self, files: list[Path], chunk: int) -> Iterator[np.ndarray]:
        """Preprocessed images in order, `chunk` at a time, decoded on worker threads."""
        with ThreadPoolExecutor(DECODE_WORKERS) as pool:
            for a in range(0, len(files), chunk):
                yield np.stack(list(pool.map(self.load, files[a: a + chunk])))


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


def build_reference(folder: str | os.PathLike, image_size: int, out: str | os.PathLike,
                    extractor: FeatureExtractor, num_images: int = DEFAULT_NUM_IMAGES,
                    seed: int = DEFAULT_SEED, chunk_size: int | None = None,
                    cache_dir: Path | None = DEFAULT_CACHE_DIR) -> Path | None:
    """Write an ADM reference batch; returns its path on rank 0 (None on the others). A collective.

    When arr_0 holds every image, its statistics and pool_3 features go into the evaluator's cache
    (`cache_dir`), so the first evaluation against the new file needs no Inception pass over it.
    """
    files = list_images(Path(folder))
    if len(files) < MIN_COV_IMAGES:
        raise EvaluationError(f"{folder} holds {len(files)} image; a reference needs at least {MIN_COV_IMAGES}")
    chunk_size = chunk_size or extractor.batch_size
    rows = share_bounds(len(files), dist.rank(), dist.world_size())
    subset = choose_subset(len(files), num_images, seed)
    writer = NpzWriter(out, len(subset), image_size, image_size) if dist.is_main() else None
    chosen = set(subset.tolist())
    decoder = Decoder(image_size)

    def own_chunks() -> Iterator[np.ndarray]:
        # Rank 0's shard comes first in file order, so its chosen images are written as they pass.
        index = rows[0]
        for chunk in decoder.chunks(files[rows[0]: rows[1]], chunk_size):
            if writer is not None:
                keep = [i for i in range(chunk.shape[0]) if index + i in chosen]
                if keep:
                    writer.write(chunk[keep])
            index += chunk.shape[0]
            yield chunk

    try:
        seed_cache = cache_dir is not None and len(subset) == len(files)
        accumulator = FeatureAccumulator(extractor, len(files), inception_score=False,
                                         keep=(POOL,) if seed_cache else ())
        extract_chunks(own_chunks(), rows, accumulator, label=f"reference {folder}")
        got = accumulator.reduce()
        warn_upsampled(decoder, len(files))
        if writer is None:
            return None
        rest = [files[i] for i in subset if i >= rows[1]]  # chosen images of the other ranks' shards
        for chunk in Decoder(image_size).chunks(rest, chunk_size):
            writer.write(chunk)
        stats = reference_stats(got)
        path = writer.close({k: stats[k] for k in STATISTICS})
        if seed_cache:
            cache_reference(cache_dir, path, extractor.weights, stats)
        return path
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
