"""Packing N PNGs into an ADM .npz: our streamed packer vs the official read-all-then-np.stack.

    python benchmarks/bench_pack.py --num 5000 --size 256 --dir /tmp/pack-bench

Each method runs in its own process; peak memory is that process's VmHWM minus its RSS after
imports (the interpreter's baseline). Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def make_pngs(folder: Path, num: int, size: int) -> None:
    """Smooth colour fields plus noise: compress like natural images, unlike pure noise."""
    from evaluation.batches import PngWriter, index_filename

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) == num:
        return
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    writer = PngWriter(workers=2)
    for i in range(num):
        a, b, c = rng.uniform(0, 6.3, 3)
        base = np.stack([np.sin(a + 4 * xx), np.cos(b + 3 * yy), np.sin(c + 2 * (xx + yy))], -1)
        img = np.clip(127.5 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        writer.submit(folder / index_filename(i, num), img)
    writer.close()


def run_official(folder: Path, out: Path, num: int) -> None:
    """What DiT's sample_ddp.py does: decode every PNG into a list, np.stack, np.savez."""
    from PIL import Image

    samples = []
    for i in range(num):
        samples.append(np.asarray(Image.open(folder / f"{i:06d}.png")).astype(np.uint8))
    np.savez(out, arr_0=np.stack(samples))


def run_ours(folder: Path, out: Path, num: int, workers: int) -> None:
    from evaluation.batches import pack_folder

    pack_folder(folder, out, num, labels=np.zeros(num, np.int64), workers=workers)


def child(method: str, folder: Path, num: int, workers: int) -> None:
    import PIL.Image  # noqa: F401  (imports count as baseline)

    import evaluation.batches  # noqa: F401

    baseline = vm_kib("VmRSS")
    out = folder.parent / f"{method}.npz"
    start = time.perf_counter()
    if method == "official":
        run_official(folder, out, num)
    else:
        run_ours(folder, out, num, workers)
    seconds = time.perf_counter() - start
    peak_mb = (vm_kib("VmHWM") - baseline) / 1024
    print(json.dumps({"method": method, "images": num, "seconds": round(seconds, 2),
                      "peak_above_baseline_mb": round(peak_mb, 1), "workers": workers}))
    out.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dir", default="/tmp/pack-bench")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    folder = Path(a.dir) / f"pngs-{a.num}-{a.size}"
    if a.child:
        child(a.child, folder, a.num, a.workers)
        return
    make_pngs(folder, a.num, a.size)
    for method in ("official", "ours"):
        subprocess.run([sys.executable, __file__, "--num", str(a.num), "--size", str(a.size), "--dir", a.dir,
                        "--workers", str(a.workers), "--child", method], check=True)


if __name__ == "__main__":
    main()
