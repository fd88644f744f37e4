"""`python -m evaluation.reference IMAGE_DIR --image-size 256 --out ref.npz`: an ADM reference batch.

Every image (found recursively: .jpg, .jpeg, .png, .gif, as ADM's loader) goes through ADM's preprocessing
(`center_crop_arr`: halve with BOX while the short side is >= 2x the target, BICUBIC so the short side equals
the target, centre crop) and then through Inception; `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial)
cover all images, streamed. `arr_0` holds `--num-images` of them for precision/recall: a seeded uniform
choice without replacement (`numpy.random.default_rng(seed).choice`), kept in file order, so the same folder
and seed always give the same file; all images when the folder holds no more than that.
Under torchrun the images are split over ranks; rank 0 writes the file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.batches import NpzWriter
from evaluation.evaluator import (
    CLI_ERRORS,
    DEFAULT_CACHE_DIR,
    EvaluationError,
    add_network_args,
    cache_reference,
    cli_warnings,
    extract_batch,
    open_extractor,
    reference_stats,
)
from evaluation.inception import InceptionExtractor
from launch import dist
from launch.exits import EXIT_BAD_INPUT
from launch.images import center_crop
from launch.shard import share_bounds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")  # ADM's _list_image_files_recursively
DEFAULT_NUM_IMAGES = 10_000  # ADM's ImageNet reference batches hold 10k images in arr_0
DEFAULT_SEED = 0
DECODE_WORKERS = max(1, min(8, os.cpu_count() or 1))

EXAMPLES = """examples:
  python -m evaluation.reference /data/imagenet/train --image-size 256 --out VIRTUAL_imagenet256.npz
  torchrun --standalone --nproc_per_node=8 -m evaluation.reference photos/ --image-size 512 --out ref512.npz \\
      --num-images 5000
"""


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in sorted path order."""
    if not folder.is_dir():
        raise EvaluationError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise EvaluationError(f"{folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return center_crop(im, size)
    except (OSError, SyntaxError, ValueError) as exc:
        raise EvaluationError(f"cannot decode {path}: {exc}") from None


def iter_images(files: list[Path], size: int, chunk: int) -> Iterator[np.ndarray]:
    """Preprocessed images in order, `chunk` at a time, decoded on worker threads."""
    with ThreadPoolExecutor(DECODE_WORKERS) as pool:
        for a in range(0, len(files), chunk):
            yield np.stack(list(pool.map(lambda f: load_image(f, size), files[a: a + chunk])))


def choose_subset(total: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of the images stored in arr_0."""
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def build_reference(folder: str | os.PathLike, image_size: int, out: str | os.PathLike,
                    extractor: InceptionExtractor, num_images: int = DEFAULT_NUM_IMAGES,
                    seed: int = DEFAULT_SEED, chunk_size: int | None = None,
                    cache_dir: Path | None = DEFAULT_CACHE_DIR) -> Path | None:
    """Write an ADM reference batch; returns its path on rank 0 (None on the others). A collective.

    When arr_0 holds every image, its statistics and pool_3 features go into the evaluator's cache
    (`cache_dir`), so the first evaluation against the new file needs no Inception pass over it.
    """
    files = list_images(Path(folder))
    if len(files) < 2:
        raise EvaluationError(f"{folder} holds {len(files)} image; a reference needs at least 2")
    chunk_size = chunk_size or extractor.batch_size
    start, stop = share_bounds(len(files), dist.rank(), dist.world_size())
    subset = choose_subset(len(files), num_images, seed)
    writer = NpzWriter(out, len(subset), image_size, image_size) if dist.is_main() else None
    chosen = set(subset.tolist())

    def own_chunks() -> Iterator[np.ndarray]:
        # Rank 0's shard comes first in file order, so its chosen images are written as they pass.
        index = start
        for chunk in iter_images(files[start:stop], image_size, chunk_size):
            if writer is not None:
                keep = [i for i in range(chunk.shape[0]) if index + i in chosen]
                if keep:
                    writer.write(chunk[keep])
            index += chunk.shape[0]
            yield chunk

    try:
        seed_cache = cache_dir is not None and len(subset) == len(files)
        got = extract_batch(own_chunks(), len(files), (start, stop), extractor, features=seed_cache,
                            label=f"reference {folder}")
        if writer is None:
            return None
        rest = [files[i] for i in subset if i >= stop]  # chosen images of the other ranks' shards
        for chunk in iter_images(rest, image_size, chunk_size):
            writer.write(chunk)
        stats = reference_stats(got)
        path = writer.close({k: stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
        if seed_cache:
            cache_reference(cache_dir, path, extractor.weights, stats)
        return path
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def build_parser() -> argparse.ArgumentParser:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(prog="python -m evaluation.reference", formatter_class=Formatter, epilog=EXAMPLES,
                                description="Build an ADM reference batch (arr_0 + mu/sigma/mu_s/sigma_s) from an "
                                            "image folder with ADM's resize and centre crop.")
    p.add_argument("image_dir", help="folder of images (searched recursively)")
    p.add_argument("--image-size", type=int, required=True, help="side of the square images (e.g. 256)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES,
                   help="images stored in arr_0 (seeded choice; statistics always use every image)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the arr_0 choice")
    add_network_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                   help="the evaluator's reference cache, seeded when arr_0 holds every image")
    p.add_argument("--no-cache", action="store_true", help="do not seed that cache")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_warnings():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.image_size < 1 or args.num_images < 1 or args.batch_size < 1:
            raise EvaluationError("--image-size, --num-images and --batch-size must be positive")
        if Path(args.out).exists() and not args.overwrite:
            raise EvaluationError(f"--out {args.out} exists; pass --overwrite to rebuild it or choose another path")
        list_images(Path(args.image_dir))  # fail fast, before loading the network
        extractor = open_extractor(args)
        out = build_reference(args.image_dir, args.image_size, args.out, extractor, args.num_images, args.seed,
                              cache_dir=None if args.no_cache else args.cache_dir)
    except CLI_ERRORS as exc:
        if dist.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        dist.shutdown()
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
