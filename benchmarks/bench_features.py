"""Benchmarks for evaluation/: Inception extraction speed, the FID square-root trace, streamed peak memory.

    python benchmarks/bench_features.py                       # all three, results printed as Markdown
    python benchmarks/bench_features.py --only extraction --images 64 --batch-size 32
    python benchmarks/bench_features.py --only memory --memory-images 8000

1. Extraction: images/s of `InceptionExtractor.extract` (pool_3 + sFID spatial + logits in one pass) against
   torch-fidelity's own `FeatureExtractorInceptionV3` forward (pool_3 + logits) on uint8 NCHW batches, as its
   data loader feeds it: same images, same weights, same process, alternating, best of `--repeats`.
2. FID: Tr(sqrt(S1 S2)) at 2048-d by ours (Cholesky or eigh + eigvalsh) against `scipy.linalg.sqrtm`.
3. Memory: peak RSS of a child process evaluating synthetic streamed .npz files (written to --tmp, removed
   after) with all metrics: the real network on a small batch (model + activations), and a stand-in network
   (a cheap random projection of the pixels, so that the run takes minutes, not hours, on a CPU) on a large
   sample file and on a quarter of it: everything else in the evaluator (streamed reading, running sums, the
   pool features kept for precision/recall, FID linear algebra, blocked k-NN) at full size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation.batches import NpzWriter  # noqa: E402
from evaluation.frechet import frechet_distance  # noqa: E402
from evaluation.inception import (  # noqa: E402
    POOL_DIM,
    SPATIAL_DIM,
    InceptionExtractor,
    InceptionWeights,
    InceptionWeightsError,
    resolve_weights,
)

IMAGE_SIDE = 256
KIB = 1024


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def synthetic_images(n: int, side: int, seed: int) -> np.ndarray:
    """Smooth random uint8 NHWC images (blocky noise plus a gradient)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, side // 16, side // 16, 3)).astype(np.float32)
    up = coarse.repeat(16, axis=1).repeat(16, axis=2)
    ramp = np.linspace(0, 60, side, dtype=np.float32)[None, :, None, None]
    return np.clip(up * 0.8 + ramp, 0, 255).astype(np.uint8)


def get_weights(path: str | None) -> InceptionWeights:
    try:
        return resolve_weights(path, allow_download=False)
    except InceptionWeightsError:
        # Speed does not depend on the values: a random torch-fidelity state dict will do.
        sys.path.insert(0, str(REPO / "tests" / "evaluation"))
        from conftest import make_random_inception_state

        file = Path(tempfile.gettempdir()) / "bench-random-inception.pth"
        torch.save(make_random_inception_state(), file)
        return InceptionWeights(file, "random (benchmark)", True)


# --------------------------------------------------------------------------------------------- 1. extraction


def bench_extraction(args: argparse.Namespace) -> dict:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = get_weights(args.weights)
    images = synthetic_images(args.images, IMAGE_SIDE, seed=0)
    ours = InceptionExtractor(weights, "cpu", args.batch_size)
    features = ["2048", "logits_unbiased"] if weights.has_classifier else ["2048"]
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", features,
                                         feature_extractor_weights_path=str(weights.path))
    def nchw_batches(size: int) -> list[torch.Tensor]:  # what torch-fidelity's DataLoader yields
        return [torch.from_numpy(images[a: a + size]).permute(0, 3, 1, 2).contiguous()
                for a in range(0, args.images, size)]

    batches = {"tf_default": nchw_batches(args.batch_size), "tf_small": nchw_batches(ours.forward_batch)}

    def run_ours() -> float:
        t0 = time.perf_counter()
        ours.extract(images)
        return time.perf_counter() - t0

    def run_theirs(key: str) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in batches[key]:
                theirs(batch)
        return time.perf_counter() - t0

    ours.extract(images[:2])
    with torch.no_grad():
        theirs(batches["tf_small"][0][:2])
    times: dict[str, list[float]] = {"ours": [], "tf_default": [], "tf_small": []}
    for _ in range(args.repeats):
        for key in ("tf_default", "tf_small"):
            times[key].append(run_theirs(key))
        times["ours"].append(run_ours())
    first = batches["tf_small"][0]
    with torch.no_grad():
        ref = theirs(first)[0]
    got = ours.extract(images[: len(first)])["pool"]
    rel = ((got - ref).norm() / ref.norm()).item()
    return {"images": args.images, "image_side": IMAGE_SIDE, "batch_size": args.batch_size,
            "forward_batch": ours.forward_batch, "weights": weights.source, "threads": torch.get_num_threads(),
            "images_per_s": {k: args.images / min(v) for k, v in times.items()}, "seconds": times,
            "pool_rel_diff": rel}


# --------------------------------------------------------------------------------------------- 2. FID


def bench_fid(args: argparse.Namespace) -> dict:
    import scipy.linalg

    d = args.fid_dim
    rng = np.random.default_rng(0)
    mix = np.eye(d) + rng.standard_normal((d, d)) * 0.02
    a = rng.standard_normal((2 * d, d)).astype(np.float32)
    b = (rng.standard_normal((2 * d, d)) @ mix).astype(np.float32)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu1, mu2 = a.mean(0, dtype=np.float64), b.mean(0, dtype=np.float64)
    t0 = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    t_ours = time.perf_counter() - t0
    # Fewer samples than dimensions on both sides: both singular, the eigh + eigvalsh path.
    s1_low, s2_low = np.cov(a[: d // 2], rowvar=False), np.cov(b[: d // 2], rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        frechet_distance(mu1, s1_low, mu2, s2_low)
        t_singular = time.perf_counter() - t0
    t0 = time.perf_counter()
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    t_sqrtm = time.perf_counter() - t0
    diff = mu1 - mu2
    fid_sqrtm = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    return {"dim": d, "ours_s": t_ours, "ours_singular_s": t_singular, "sqrtm_s": t_sqrtm,
            "fid_ours": ours, "fid_sqrtm": fid_sqrtm, "rel_diff": abs(ours - fid_sqrtm) / abs(fid_sqrtm)}


# --------------------------------------------------------------------------------------------- 3. memory


def write_synthetic_npz(path: Path, n: int, chunk: int = 256) -> None:
    writer = NpzWriter(path, n, IMAGE_SIDE, IMAGE_SIDE)
    for a in range(0, n, chunk):
        writer.write(synthetic_images(min(chunk, n - a), IMAGE_SIDE, seed=a))
    writer.close()


def _install_stand_in_network() -> None:
    """Replace the Inception forward by a cheap fixed random projection with the same output shapes."""
    rng = np.random.default_rng(0)
    proj_pool = torch.from_numpy(rng.standard_normal((192, POOL_DIM)).astype(np.float32)) / 8
    proj_spatial = torch.from_numpy(rng.standard_normal((192, SPATIAL_DIM)).astype(np.float32)) / 8

    def forward(self: InceptionExtractor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1)  # [B, 192]
        return {"pool": torch.relu(x @ proj_pool), "spatial": torch.relu(x @ proj_spatial)}

    InceptionExtractor._forward = forward  # type: ignore[method-assign]


def memory_child(args: argparse.Namespace) -> None:
    """Evaluate the sample file args.memory_child against args.memory_ref; print peak RSS (MiB) as JSON."""
    from evaluation.report import evaluate

    if args.stand_in:
        _install_stand_in_network()
    weights = get_weights(args.weights)
    extractor = InceptionExtractor(weights, "cpu", args.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        report = evaluate(args.memory_ref, args.memory_child, extractor, ["fid", "sfid", "prec", "recall"],
                          cache_dir=None)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "seconds": time.perf_counter() - t0,
                      "images": report["num_samples"], "reference_images": report["num_reference"],
                      "fid": report["fid"], "recall": report["recall"]}))


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Unlike getrusage's ru_maxrss, it is not inherited from the
    parent across fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / KIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB


def bench_memory(args: argparse.Namespace) -> dict:
    """Peak RSS for growing sample files against one reference file (all synthetic, removed afterwards)."""
    folder = Path(args.tmp)
    folder.mkdir(parents=True, exist_ok=True)
    runs = {}
    plans = [("real network", args.memory_real_images, args.memory_real_images, False),
             ("stand-in network", args.memory_images // 4, args.memory_ref_images, True),
             ("stand-in network", args.memory_images, args.memory_ref_images, True)]
    files: dict[int, Path] = {}

    def synthetic(n: int) -> Path:
        if n not in files:
            files[n] = folder / f"bench-synthetic-{n}.npz"
            write_synthetic_npz(files[n], n)
        return files[n]

    try:
        for label, n, n_ref, stand_in in plans:
            ref, sample = synthetic(n_ref), synthetic(n)
            cmd = [sys.executable, __file__, "--memory-child", str(sample), "--memory-ref", str(ref),
                   "--batch-size", str(args.batch_size)]
            if stand_in:
                cmd.append("--stand-in")
            if args.weights:
                cmd += ["--weights", args.weights]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update({"network": label, "file_gib": sample.stat().st_size / KIB ** 3})
            runs[f"{label} {n}"] = result
            print(f"memory: {json.dumps(result)}", file=sys.stderr, flush=True)
    finally:
        for file in files.values():
            file.unlink(missing_ok=True)
    return runs


# --------------------------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = [f"CPU: {results['cpu']} ({results['cores']} cores), torch {results['torch']}", ""]
    if "extraction" in results:
        e = results["extraction"]
        ips = e["images_per_s"]
        lines += ["| extraction (CPU, float32) | images/s |", "|---|---|",
                  f"| ours (`--batch-size {e['batch_size']}`, CPU forwards of {e['forward_batch']}, channels-last): "
                  f"pool_3 + spatial + logits | {ips['ours']:.2f} |",
                  f"| torch-fidelity FeatureExtractorInceptionV3, batch {e['batch_size']}: pool_3 + logits | "
                  f"{ips['tf_default']:.2f} |",
                  f"| torch-fidelity FeatureExtractorInceptionV3, batch {e['forward_batch']}: pool_3 + logits | "
                  f"{ips['tf_small']:.2f} |", "",
                  f"{e['images']} images {e['image_side']}x{e['image_side']}, {e['threads']} threads, weights: "
                  f"{e['weights']}, best of {len(e['seconds']['ours'])}; pool_3 relative difference "
                  f"{e['pool_rel_diff']:.1e}.", ""]
    if "fid" in results:
        f = results["fid"]
        lines += [f"| Tr sqrt(S1 S2), {f['dim']}-d | seconds |", "|---|---|",
                  f"| ours, n = 2d, positive definite (Cholesky + eigvalsh) | {f['ours_s']:.2f} |",
                  f"| ours, S1 and S2 singular, n = d/2 (eigh + eigvalsh) | {f['ours_singular_s']:.2f} |",
                  f"| scipy.linalg.sqrtm(S1 @ S2) | {f['sqrtm_s']:.2f} |", "",
                  f"FID relative difference to sqrtm: {f['rel_diff']:.1e}.", ""]
    if "memory" in results:
        lines += ["| peak RSS, all metrics | sample images | sample file GiB | reference images | peak MiB | s |",
                  "|---|---|---|---|---|---|"]
        for r in results["memory"].values():
            lines.append(f"| {r['network']} | {r['images']} | {r['file_gib']:.2f} | {r['reference_images']} | "
                         f"{r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["extraction", "fid", "memory"], action="append")
    p.add_argument("--images", type=int, default=64, help="images for the extraction benchmark")
    p.add_argument("--batch-size", type=int, default=64, help="as the evaluator's --batch-size (its default)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--weights", help="Inception weights (default: resolve offline, else random)")
    p.add_argument("--fid-dim", type=int, default=POOL_DIM)
    p.add_argument("--memory-images", type=int, default=8000,
                   help="synthetic sample .npz (8000 -> 1.5 GiB, 50000 -> 9.2 GiB); a quarter of it is run too")
    p.add_argument("--memory-ref-images", type=int, default=2000, help="synthetic reference .npz")
    p.add_argument("--memory-real-images", type=int, default=96, help="images for the real-network memory run")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the synthetic .npz is written")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--memory-ref", help=argparse.SUPPRESS)
    p.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    todo = args.only or ["extraction", "fid", "memory"]
    results: dict = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    for name, fn in (("extraction", bench_extraction), ("fid", bench_fid), ("memory", bench_memory)):
        if name in todo:
            results[name] = fn(args)
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
