"""The end of a run, on rank 0 after the last collective: grid.png, `<run>.npz` (PNGs packed, or the image shards
assembled without decoding) and `<run>.metrics.json` (the evaluator's report of the images in that `.npz`).

Both the end of a run and `--pack-only` hold the run folder's lock while they write: another run of the same
command cannot open the folder (and remove this one's `.npz` temporary as a leftover) meanwhile; `--pack-only`
removes what a killed writer left (a `.<run>.npz.tmp-*` of a packing killed midway) first.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.batches import pack_folder
from evaluation.metrics import format_report, format_spread, parse_metrics
from launch.runtime import rundir
from launch.runtime.files import atomic_write, available_cpus, write_json_atomic
from sampling.config import SAVE_NONE, SAVE_NPZ, SAVE_PNG, ConfigError, SampleConfig


def grid_images(cfg: SampleConfig, run: str) -> np.ndarray:
    """The first 64 images, uint8 [n, H, W, 3], from the PNGs or the image shards."""
    n = min(rundir.GRID_SIZE, cfg.num_fid_samples)
    if cfg.save != SAVE_PNG:
        return rundir.ImageShards.scan(cfg.run_dir, cfg.num_fid_samples, cfg.image_size, run).read(range(n))
    return np.stack([np.asarray(Image.open(cfg.folder.png(i, cfg.num_fid_samples)).convert("RGB"))
                     for i in range(n)])


def write_grid(cfg: SampleConfig, run: str) -> None:
    """`grid.png`: the first 64 images side by side."""
    images = grid_images(cfg, run)
    n = images.shape[0]
    side = math.ceil(math.sqrt(n))
    rows = math.ceil(n / side)
    h, w = images.shape[1:3]
    grid = np.zeros((rows * h, side * w, 3), np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, side)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    with atomic_write(cfg.folder.grid) as f:
        Image.fromarray(grid).save(f, format="PNG")


@contextlib.contextmanager
def holding_folder(cfg: SampleConfig) -> Iterator[None]:
    """The run folder's lock, held while the end of a run writes beside the folder."""
    lock = rundir.RunLock(cfg.run_dir)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def pack(cfg: SampleConfig) -> Path:
    """--pack-only: `pack_folder_npz` with the folder's lock held, after removing what killed writers left."""
    if rundir.Manifest.read(cfg.run_dir) is None:
        raise ConfigError(f"{cfg.run_dir} has no {rundir.MANIFEST_NAME}; nothing to pack (run the sampler first)")
    with holding_folder(cfg):
        cfg.folder.remove_temporaries()
        return pack_folder_npz(cfg)


def pack_folder_npz(cfg: SampleConfig) -> Path:
    """Stream the run folder's images (PNGs, or image shards without decoding) into `<run>.npz` (arr_0 images,
    arr_1 labels); rank 0 only. The `.npz` already there is replaced only by a complete, checked one."""
    manifest = rundir.Manifest.read(cfg.run_dir)
    if manifest is None:
        raise ConfigError(f"{cfg.run_dir} has no {rundir.MANIFEST_NAME}; nothing to pack (run the sampler first)")
    n = manifest.identity["num_fid_samples"]
    if cfg.num_fid_samples != n:
        raise ConfigError(f"--num-fid-samples {cfg.num_fid_samples} but {cfg.run_dir} was sampled with {n}; "
                          f"drop the flag or pass --num-fid-samples {n}")
    save = manifest.identity.get("save", SAVE_PNG)
    if save == SAVE_NONE:
        raise ConfigError(f"{cfg.run_dir} was sampled with --save none: it holds no images to pack")
    out = cfg.folder.npz
    labels = np.asarray(manifest.data["labels"], dtype=np.int64)
    start = time.time()
    if save == SAVE_NPZ:
        shards = rundir.ImageShards.scan(cfg.run_dir, n, cfg.image_size, rundir.run_id(manifest.identity))
        rundir.assemble_npz(shards, out, labels)
    else:
        pack_folder(cfg.run_dir, out, n, labels=labels, workers=max(2, available_cpus()))
    print(f"Saved .npz file to {out} [shape=({n}, {cfg.image_size}, {cfg.image_size}, 3)] "
          f"in {time.time() - start:.1f}s", flush=True)
    return out


def write_metrics(cfg: SampleConfig, report: dict, npz: Path | None) -> None:
    """`<run>.metrics.json` (the evaluator's keys plus the inputs) and ADM's lines on stdout."""
    inputs = {"reference_batch": str(Path(cfg.ref).resolve()), "sample_batch": str(npz.resolve()) if npz else None,
              "run_dir": str(cfg.run_dir.resolve())}
    write_json_atomic(cfg.metrics_path, {**inputs, **report})
    metrics = parse_metrics(cfg.metrics)
    for line in [*format_report(report, metrics), *format_spread(report, metrics)]:
        print(line, flush=True)
    print(f"Saved metrics to {cfg.metrics_path}", flush=True)


def finish_folder(cfg: SampleConfig, run: str, report: dict | None) -> None:
    """Rank 0, after the sampling: close the session, write grid.png, the `.npz` and the metrics (the folder's
    lock held)."""
    with holding_folder(cfg):
        rundir.Manifest.read(cfg.run_dir).finish_session()
        write_grid(cfg, run)
        npz = pack_folder_npz(cfg) if cfg.save != SAVE_NONE and not cfg.no_npz else None
        if report is not None:
            write_metrics(cfg, report, npz)
