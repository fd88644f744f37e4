"""The final ADM .npz of a run: assembled from image shards (`--save npz`) vs packed from PNGs (`--save png`).

    python benchmarks/bench_shards.py --num 2000 --size 256 --dir /tmp/shard-bench

The same images are written once as index-named PNGs and once as the sampler's image shards (blocks of
`--shard-size`), then each way of making `<run>.npz` runs in turn (best of `--repeat`): `pack_folder` (decode
every PNG, worker processes as the sampler uses them) and `assemble_npz` (copy the shards' bytes in index order,
nothing decoded). The two .npz files must be byte-identical. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.batches import PngWriter, pack_folder  # noqa: E402
from launch.runtime.files import available_cpus  # noqa: E402
from launch.runtime.rundir import IMAGES_DIR, BlockWriter, ImageShards, assemble_npz, index_filename  # noqa: E402
from sampling.config import DEFAULT_BLOCK_IMAGES  # noqa: E402

RUN_ID = "bench"  # the run identity's id the shards carry (checked when assembled)


def synthetic(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour fields plus noise: compress like natural images, unlike pure noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b, c = rng.uniform(0, 6.3, 3)
    base = np.stack([np.sin(a + 4 * xx), np.cos(b + 3 * yy), np.sin(c + 2 * (xx + yy))], -1)
    return np.clip(127.5 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def make_run(folder: Path, num: int, size: int, shard_size: int, batch: int = 32) -> None:
    """Both layouts of one run: PNGs and image shards of the same images."""
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pngs = PngWriter(workers=2)
    shards = BlockWriter(num, shard_size, RUN_ID, folder / IMAGES_DIR, None)
    for start in range(0, num, batch):
        indices = list(range(start, min(num, start + batch)))
        images = np.stack([synthetic(rng, size) for _ in indices])
        for i, image in zip(indices, images):
            pngs.submit(folder / index_filename(i, num), image)
        shards.add(indices, images, None)
    shards.flush()
    pngs.close()
    (folder / "done").touch()


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=DEFAULT_BLOCK_IMAGES)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dir", type=Path, default=Path("/tmp/shard-bench"))
    args = p.parse_args()
    folder = args.dir / f"run-{args.num}-{args.size}"
    make_run(folder, args.num, args.size, args.shard_size)
    labels = np.zeros(args.num, np.int64)
    workers = max(2, available_cpus())  # what sampling.finish.pack uses
    png_out, shard_out = args.dir / "from-pngs.npz", args.dir / "from-shards.npz"
    png_s, shard_s = [], []
    for _ in range(args.repeat):  # alternating, so both see the same machine load and page cache
        png_s.append(timed(lambda: pack_folder(folder, png_out, args.num, labels=labels, workers=workers)))
        shard_s.append(timed(lambda: assemble_npz(ImageShards.scan(folder, args.num, args.size, RUN_ID), shard_out,
                                                  labels)))
    assert png_out.read_bytes() == shard_out.read_bytes(), "the two .npz files differ"
    files = {"png": len(list(folder.glob("*.png"))), "shards": len(list((folder / IMAGES_DIR).glob("*.npz")))}
    print(json.dumps({"images": args.num, "size": args.size, "cpus": available_cpus(), "pack_workers": workers,
                      "pack_from_pngs_s": round(min(png_s), 3), "assemble_from_shards_s": round(min(shard_s), 3),
                      "speedup": round(min(png_s) / min(shard_s), 1), "files": files,
                      "npz_bytes": png_out.stat().st_size}))


if __name__ == "__main__":
    main()
