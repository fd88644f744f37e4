"""The metrics of a sampling run, computed inside the sampling job (`sample_ddp.py --ref`): no image is read back.

`check_run_inputs` does every check of the reference and the metric choice that needs no network (before any
model is loaded). `RunEvaluation.open` then loads, once per process, what every run shares: the networks the
metrics need (Inception; DINOv2 for FD_DINOv2) on the sampling device, as one extractor that sees each uint8
batch, the reference statistics (from the evaluator's cache, or one pass over its arr_0), the networks'
identity that keys the stored features and the evaluation's protocol (hashes computed once). Per run,
`accumulator()` makes the rank's FeatureAccumulator and `report()` reduces it over the ranks as the sharded
evaluator does and returns the evaluator's JSON report (the keys of `python -m evaluation.evaluator --json`,
with its `protocol`; the sampler adds its fields with `evaluation.protocol.add_sampling_fields`).
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
from evaluation.dinov2 import DEFAULT_RESIZE, RESIZE_FLAG, RESIZE_MODES, DinoV2Extractor
from evaluation.errors import EvaluationError
from evaluation.features import FeatureAccumulator, FeatureExtractor
from evaluation.inception import InceptionExtractor
from evaluation.inputs import REFERENCE, CheckedBatch, EvaluationInputs, check_batch, check_inputs
from evaluation.metrics import MANIFOLD_METRICS, METRIC_IS, parse_metrics
from evaluation.networks import FeatureNetworks, expected_dims, features_id, resolve_network_weights, weights_id
from evaluation.precision_recall import NEAREST_K
from evaluation.protocol import PROTOCOL_KEY, with_counts
from evaluation.reference_cache import Reference, load_reference
from evaluation.report import counts, report_metrics, report_protocol, run_facts, sample_accumulator
from evaluation.statistics import MIN_COV_IMAGES
from launch.runtime import dist

SAMPLES_FLAG = "--num-fid-samples"
__all__ = ["RunEvaluation", "check_reference", "check_run_inputs", "weights_id"]  # weights_id: evaluation.networks


class SampledImages(ImageBatch):
    """The images a sampling run makes, as the sample side of an evaluation: counted, never read back."""

    def __init__(self, run_dir: Path, num_images: int, image_size: int):
        self.path, self.num_images, self.height, self.width = run_dir, num_images, image_size, image_size

    def iter_chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator:
        raise BatchError(f"{self.path}: the sampled images go through the feature networks as they are made")


def check_reference(ref: str | os.PathLike, metrics: str,
                    dinov2_resize: str = DEFAULT_RESIZE) -> tuple[CheckedBatch, tuple[str, ...]]:
    """--ref opened (headers only) and checked to serve --metrics: one line naming --ref otherwise.
    `dinov2_resize` (--dinov2-resize) picks which stored DINOv2 statistics apply."""
    chosen = tuple(parse_metrics(metrics))
    if dinov2_resize not in RESIZE_MODES:
        raise EvaluationError(f"{RESIZE_FLAG} {dinov2_resize!r}: choose from {', '.join(RESIZE_MODES)}")
    if Path(ref).is_dir():
        raise EvaluationError(f"--ref {ref} is a folder; pass the reference batch file (.npz), e.g. one built by "
                              "python -m evaluation.reference")
    if not Path(ref).is_file():
        raise EvaluationError(f"--ref {ref}: no such file; pass the reference batch (.npz) to compare with")
    try:
        return check_batch(ref, REFERENCE, chosen, expected_dims(), dinov2_resize), chosen
    except (BatchError, EvaluationError) as exc:
        raise EvaluationError(f"--ref: {exc}") from None


def check_run_inputs(reference: CheckedBatch, metrics: tuple[str, ...], run_dir: Path, num_images: int,
                     image_size: int, bootstrap: int = 0, dinov2_resize: str = DEFAULT_RESIZE) -> EvaluationInputs:
    """The evaluation of a run of `num_images` against a checked reference, validated before any sampling."""
    if num_images < MIN_COV_IMAGES:
        raise EvaluationError(f"{SAMPLES_FLAG} {num_images}: the metrics need at least {MIN_COV_IMAGES} images")
    if set(metrics) & MANIFOLD_METRICS and num_images <= NEAREST_K:
        raise EvaluationError(f"{SAMPLES_FLAG} {num_images}: precision/recall need more than {NEAREST_K} images "
                              "(k-nearest neighbours); sample more or drop prec,recall from --metrics")
    return check_inputs(reference.batch, SampledImages(run_dir, num_images, image_size), metrics, expected_dims(),
                        bootstrap, dinov2_resize)


@dataclass
class RunEvaluation:
    """What the in-job metrics of every run of a process share, loaded once."""

    reference_batch: CheckedBatch
    metrics: tuple[str, ...]
    extractor: FeatureNetworks  # every network the metrics need, as one extractor
    reference: Reference
    weights_id: str  # keys the stored features: other weights never mix with these
    bootstrap: int = 0
    bootstrap_seed: int = 0
    dinov2_resize: str = DEFAULT_RESIZE
    protocol: dict[str, Any] | None = None  # the evaluation's protocol without the counts

    @classmethod
    def open(cls, reference_batch: CheckedBatch, metrics: tuple[str, ...], device: Any, batch_size: int,
             weights_path: str | None = None, allow_download: bool = True, cache_dir: Path | None = None,
             bootstrap: int = 0, bootstrap_seed: int = 0, *, dinov2_weights: str | None = None,
             dinov2_resize: str = DEFAULT_RESIZE) -> RunEvaluation:
        """Find the weights the metrics need (rank 0 first: it may download; `weights_path`: Inception's,
        `dinov2_weights`: DINOv2's), load those networks on `device`, get the reference statistics (a
        collective: from the cache, or one pass over arr_0 shared by the ranks)."""
        inception, dino = resolve_network_weights(metrics, weights_path, dinov2_weights, allow_download)
        if METRIC_IS in metrics and not inception.has_classifier:
            if metrics == (METRIC_IS,):
                raise EvaluationError(inception.is_unavailable_reason())
            if dist.is_main():
                print(inception.is_unavailable_reason(), file=sys.stderr, flush=True)
        nets: list[FeatureExtractor] = []  # the names of this module, which tests may replace
        if inception is not None:
            nets.append(InceptionExtractor(inception, device, batch_size))
        if dino is not None:
            nets.append(DinoV2Extractor(dino, device, batch_size, dinov2_resize))
        extractor = FeatureNetworks(nets)
        reference = load_reference(reference_batch, metrics, extractor, cache_dir, batch_size)
        identity = dist.rank0_shares(lambda: features_id(extractor))
        protocol = dist.rank0_shares(lambda: report_protocol(reference_batch.batch.path, extractor, bootstrap,
                                                          bootstrap_seed, cache_dir))
        return cls(reference_batch, metrics, extractor, reference, identity, bootstrap, bootstrap_seed,
                   dinov2_resize, protocol)

    def inputs(self, run_dir: Path, num_images: int, image_size: int) -> EvaluationInputs:
        return check_run_inputs(self.reference_batch, self.metrics, run_dir, num_images, image_size, self.bootstrap,
                                self.dinov2_resize)

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
        if self.protocol is not None:
            report[PROTOCOL_KEY] = with_counts(self.protocol, *counts(inputs, self.reference))
        return report

