"""The metrics of a sampling run, computed inside the sampling job (`sample_ddp.py --ref`): no image is read back.

`check_run_inputs` does every check of the reference and the metric choice that needs no network (before any
model is loaded). `RunEvaluation.open` then loads, once per process, what every run shares: Inception on the
sampling device, the reference statistics (from the evaluator's cache, or one pass over its arr_0) and the
weights' identity that keys the stored features. Per run, `accumulator()` makes the rank's FeatureAccumulator
and `report()` reduces it over the ranks as the sharded evaluator does and returns the evaluator's JSON report
(the keys of `python -m evaluation.evaluator --json`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.batches import BatchError, ImageBatch
from evaluation.errors import EvaluationError
from evaluation.features import FeatureAccumulator
from evaluation.inception import FEATURE_DIMS, InceptionExtractor, InceptionWeights, resolve_weights_on_every_rank
from evaluation.inputs import REFERENCE, CheckedBatch, EvaluationInputs, check_batch, check_inputs
from evaluation.metrics import MANIFOLD_METRICS, METRIC_IS, parse_metrics
from evaluation.precision_recall import NEAREST_K
from evaluation.reference_cache import Reference, load_reference
from evaluation.report import report_metrics, run_facts, sample_accumulator
from evaluation.statistics import MIN_COV_IMAGES
from launch.runtime import dist
from launch.runtime.files import file_sha256

SAMPLES_FLAG = "--num-fid-samples"
FEATURES_VERSION = 1  # bump when what a feature block holds changes
WEIGHTS_ID_CHARS = 16


def weights_id(weights: InceptionWeights) -> str:
    """What stored features depend on: the content hash of the network's weights file (and the block format)."""
    return f"v{FEATURES_VERSION}-{file_sha256(weights.path)[:WEIGHTS_ID_CHARS]}"


class SampledImages(ImageBatch):
    """The images a sampling run makes, as the sample side of an evaluation: counted, never read back."""

    def __init__(self, run_dir: Path, num_images: int, image_size: int):
        self.path, self.num_images, self.height, self.width = run_dir, num_images, image_size, image_size

    def iter_chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator:
        raise BatchError(f"{self.path}: the sampled images go through Inception as they are made")


def check_reference(ref: str | os.PathLike, metrics: str) -> tuple[CheckedBatch, tuple[str, ...]]:
    """--ref opened (headers only) and checked to serve --metrics: one line naming --ref otherwise."""
    chosen = tuple(parse_metrics(metrics))
    if Path(ref).is_dir():
        raise EvaluationError(f"--ref {ref} is a folder; pass the reference batch file (.npz), e.g. one built by "
                              "python -m evaluation.reference")
    if not Path(ref).is_file():
        raise EvaluationError(f"--ref {ref}: no such file; pass the reference batch (.npz) to compare with")
    try:
        return check_batch(ref, REFERENCE, chosen, FEATURE_DIMS), chosen
    except (BatchError, EvaluationError) as exc:
        raise EvaluationError(f"--ref: {exc}") from None


def check_run_inputs(reference: CheckedBatch, metrics: tuple[str, ...], run_dir: Path, num_images: int,
                     image_size: int, bootstrap: int = 0) -> EvaluationInputs:
    """The evaluation of a run of `num_images` against a checked reference, validated before any sampling."""
    if num_images < MIN_COV_IMAGES:
        raise EvaluationError(f"{SAMPLES_FLAG} {num_images}: the metrics need at least {MIN_COV_IMAGES} images")
    if set(metrics) & MANIFOLD_METRICS and num_images <= NEAREST_K:
        raise EvaluationError(f"{SAMPLES_FLAG} {num_images}: precision/recall need more than {NEAREST_K} images "
                              "(k-nearest neighbours); sample more or drop prec,recall from --metrics")
    return check_inputs(reference.batch, SampledImages(run_dir, num_images, image_size), metrics, FEATURE_DIMS,
                        bootstrap)


@dataclass
class RunEvaluation:
    """What the in-job metrics of every run of a process share, loaded once."""

    reference_batch: CheckedBatch
    metrics: tuple[str, ...]
    extractor: InceptionExtractor
    reference: Reference
    weights_id: str  # keys the stored features: other weights never mix with these
    bootstrap: int = 0
    bootstrap_seed: int = 0

    @classmethod
    def open(cls, reference_batch: CheckedBatch, metrics: tuple[str, ...], device: Any, batch_size: int,
             weights_path: str | None = None, allow_download: bool = True, cache_dir: Path | None = None,
             bootstrap: int = 0, bootstrap_seed: int = 0) -> RunEvaluation:
        """Find the weights (rank 0 first: it may download), load Inception on `device`, get the reference
        statistics (a collective: from the cache, or one pass over arr_0 shared by the ranks)."""
        weights = resolve_weights_on_every_rank(weights_path, allow_download=allow_download)
        if METRIC_IS in metrics and not weights.has_classifier:
            if metrics == (METRIC_IS,):
                raise EvaluationError(weights.is_unavailable_reason())
            if dist.is_main():
                print(weights.is_unavailable_reason(), file=sys.stderr, flush=True)
        extractor = InceptionExtractor(weights, device, batch_size)
        reference = load_reference(reference_batch, metrics, extractor, cache_dir, batch_size)
        identity = dist.rank0_shares(lambda: weights_id(weights))
        return cls(reference_batch, metrics, extractor, reference, identity, bootstrap, bootstrap_seed)

    def inputs(self, run_dir: Path, num_images: int, image_size: int) -> EvaluationInputs:
        return check_run_inputs(self.reference_batch, self.metrics, run_dir, num_images, image_size, self.bootstrap)

    def accumulator(self, inputs: EvaluationInputs) -> FeatureAccumulator:
        """This rank's accumulator of one run: only what the metrics (and the bootstrap) need."""
        accumulator = sample_accumulator(self.extractor, inputs)
        assert accumulator is not None  # every metric needs the sample's features: none are given in a file
        return accumulator

    def report(self, inputs: EvaluationInputs, accumulator: FeatureAccumulator, seconds: float) -> dict[str, Any]:
        """The evaluator's report of the run (a collective: the same on every rank). `seconds`: the time the
        evaluation took so far (extraction during sampling); the reduction and the metrics are added."""
        start = time.perf_counter()
        features = accumulator.reduce()
        report: dict[str, Any] = report_metrics(self.reference, features, self.metrics, None, self.extractor.device,
                                                self.bootstrap, self.bootstrap_seed)
        if METRIC_IS in self.metrics and not self.extractor.has_logits:
            report["inception_score_unavailable"] = self.extractor.weights.is_unavailable_reason()
        report.update(run_facts(inputs, self.reference, self.extractor, seconds + time.perf_counter() - start))
        if self.bootstrap:
            report["bootstrap"] = {"resamples": self.bootstrap, "seed": self.bootstrap_seed}
        return report

