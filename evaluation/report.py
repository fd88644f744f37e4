"""ADM's report of a sample batch against a reference batch: `evaluate()` and the metrics of accumulated features.

`evaluate(ref, sample, extractor)` = check the inputs, get the reference statistics (`load_reference`), run the
sample through a `FeatureAccumulator`, then `report_metrics(reference, features)`. A sampling job that feeds its
own accumulator batch by batch calls `report_metrics` with it and gets the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from evaluation.bootstrap import bootstrap_spread
from evaluation.features import (
    ALL_FEATURES,
    DINOV2,
    LOGITS,
    POOL,
    SPATIAL,
    BatchFeatures,
    FeatureAccumulator,
    FeatureExtractor,
    extract_batch,
)
from evaluation.frechet import frechet_distance
from evaluation.inputs import BatchInput, EvaluationInputs, Gaussian, check_inputs
from evaluation.metrics import (
    ALL_METRICS,
    FRECHET_FEATURES,
    JSON_KEYS,
    MANIFOLD_FEATURES,
    MANIFOLD_PAIRS,
    METRIC_IS,
    METRICS,
    PRINT_NAMES,
)
from evaluation.networks import dinov2_resize_of, networks_of, protocol_networks
from evaluation.precision_recall import NEAREST_K, precision_recall
from evaluation.protocol import PROTOCOL_KEY, evaluation_protocol, with_counts
from evaluation.reference_cache import COMPUTED, DEFAULT_CACHE_DIR, GIVEN, Reference, load_reference
from evaluation.statistics import IS_SPLIT_SIZE
from launch.runtime import dist
from launch.runtime.versions import package_versions

STATS_LABELS = {POOL: "sample pool_3", SPATIAL: "sample spatial", DINOV2: "sample DINOv2"}


def report_metrics(reference: Reference, sample: BatchFeatures, metrics: Iterable[str],
                   sample_given: Mapping[str, Gaussian] | None = None, device: str | torch.device | None = None,
                   bootstrap: int = 0, bootstrap_seed: int = 0) -> dict[str, float | None]:
    """The metric keys of the report (inception_score, fid, sfid, precision, recall, fd_dinov2, dinov2_precision,
    dinov2_recall; `<key>_std` with a bootstrap) from the reference and the sample's combined features. A
    collective; the same on every rank.

    `sample_given`: statistics stored in the sample file, used instead of its features (ADM's read_statistics).
    """
    wanted = set(metrics)
    given = sample_given or {}
    report: dict[str, float | None] = {}
    if METRIC_IS in wanted:
        report[JSON_KEYS[METRIC_IS]] = sample.inception.score() if sample.inception is not None else None
    stats = sample.statistics()

    def frechet(m: str) -> float:
        kind = FRECHET_FEATURES[m]
        mine = given.get(kind) or (stats[kind].mean(), stats[kind].cov(STATS_LABELS[kind]))
        return frechet_distance(*mine, *reference.statistics[kind], name=PRINT_NAMES[m])

    # The Frechet distances are a few seconds of float64 linear algebra: rank 0 computes, all ranks receive.
    report.update(dist.rank0_shares(lambda: {JSON_KEYS[m]: frechet(m) for m in ALL_METRICS
                                          if m in wanted and m in FRECHET_FEATURES}))
    for kind, pair in MANIFOLD_PAIRS.items():  # pool_3 (ADM's), DINOv2's
        if wanted & set(pair):
            values = precision_recall(reference.features[kind], sample.rows[kind], device=device)
            report.update({JSON_KEYS[m]: v for m, v in zip(pair, values) if m in wanted})
    if bootstrap:
        report.update(bootstrap_spread(reference, sample, [m for m in ALL_METRICS if m in wanted], bootstrap,
                                       bootstrap_seed))
    return report


def sample_accumulator(extractor: FeatureExtractor, inputs: EvaluationInputs) -> FeatureAccumulator | None:
    """An accumulator computing only what the metrics need of the sample (None: nothing to extract)."""
    wanted, given = set(inputs.metrics), inputs.sample.given
    stats = [kind for m, kind in FRECHET_FEATURES.items() if m in wanted and kind not in given]
    inception_score = METRIC_IS in wanted and extractor.has_logits
    keep = {MANIFOLD_FEATURES[m] for m in wanted if m in MANIFOLD_FEATURES}
    if inputs.bootstrap:  # the resamples reweight each image's features
        keep |= {*stats, *([LOGITS] if inception_score else [])}
    if not (stats or inception_score or keep):
        return None
    return FeatureAccumulator(extractor, inputs.sample.batch.num_images, stats=stats,
                              inception_score=inception_score, keep=[k for k in ALL_FEATURES if k in keep])


def evaluate_inputs(inputs: EvaluationInputs, extractor: FeatureExtractor,
                    cache_dir: Path | None = DEFAULT_CACHE_DIR, chunk_size: int | None = None,
                    bootstrap_seed: int = 0) -> dict[str, Any]:
    """`evaluate` of inputs already checked (the CLI checks them before it loads the network)."""
    chunk_size = chunk_size or extractor.batch_size
    t0 = time.perf_counter()
    reference = load_reference(inputs.ref, inputs.metrics, extractor, cache_dir, chunk_size)
    sample = inputs.sample.batch
    accumulator = sample_accumulator(extractor, inputs)
    features = (extract_batch(sample, accumulator, chunk_size, f"samples {sample.path}") if accumulator is not None
                else BatchFeatures(sample.num_images))
    report: dict[str, Any] = report_metrics(reference, features, inputs.metrics, inputs.sample.given,
                                            extractor.device, inputs.bootstrap, bootstrap_seed)
    if METRIC_IS in inputs.metrics and not extractor.has_logits:
        report["inception_score_unavailable"] = extractor.weights.is_unavailable_reason()
    report.update(run_facts(inputs, reference, extractor, time.perf_counter() - t0))
    if inputs.bootstrap:
        report["bootstrap"] = {"resamples": inputs.bootstrap, "seed": bootstrap_seed}
    protocol = dist.rank0_shares(lambda: report_protocol(inputs.ref.batch.path, extractor, inputs.bootstrap,
                                                      bootstrap_seed, cache_dir))
    report[PROTOCOL_KEY] = with_counts(protocol, *counts(inputs, reference))
    return report


def report_protocol(reference_path: Path, extractor: FeatureExtractor, bootstrap: int, bootstrap_seed: int,
                    memo_dir: Path | None) -> dict[str, Any]:
    """The protocol of an evaluation against `reference_path` with `extractor`, without counts (rank 0: it
    hashes the reference and the weights, remembered in `memo_dir`)."""
    settings = {"nearest_k": NEAREST_K, "is_split_size": IS_SPLIT_SIZE, "bootstrap_resamples": bootstrap,
                "bootstrap_seed": bootstrap_seed if bootstrap else None}
    return evaluation_protocol(reference_path, protocol_networks(extractor), settings, memo_dir)


def counts(inputs: EvaluationInputs, reference: Reference) -> tuple[int | None, int | None]:
    """(sample images, reference images) of an evaluation (None: a file of statistics only)."""
    return inputs.sample.batch.num_images if inputs.sample.batch.has_images else None, reference.num_images


def evaluate(ref_path: BatchInput, sample_path: BatchInput, extractor: FeatureExtractor,
             metrics: Iterable[str] = METRICS, cache_dir: Path | None = DEFAULT_CACHE_DIR,
             chunk_size: int | None = None, *, bootstrap: int = 0, bootstrap_seed: int = 0) -> dict[str, Any]:
    """Compute the requested ADM metrics; returns the JSON report (metric keys map to floats or None).
    Every input is checked before any image goes through the network. A collective under torchrun."""
    inputs = check_inputs(ref_path, sample_path, metrics, extractor.feature_dims, bootstrap,
                          dinov2_resize_of(extractor))
    return evaluate_inputs(inputs, extractor, cache_dir, chunk_size, bootstrap_seed)


def run_facts(inputs: EvaluationInputs, reference: Reference, extractor: FeatureExtractor,
              seconds: float) -> dict[str, Any]:
    """Counts, sources, weights, device and versions: what the report says about how it was made."""
    nets = networks_of(extractor)
    inception = next((net.weights for net in nets if POOL in net.feature_dims), None)
    dinov2 = next((net.weights for net in nets if DINOV2 in net.feature_dims), None)
    return {
        "num_samples": inputs.sample.batch.num_images if inputs.sample.batch.has_images else None,
        "num_reference": reference.num_images,
        "reference_statistics": reference.source,
        "sample_statistics": GIVEN if inputs.sample.given else COMPUTED,
        "inception_weights": None if inception is None else {
            "path": str(inception.path), "source": inception.source, "has_classifier": inception.has_classifier},
        **({} if dinov2 is None else {"dinov2_weights": {"path": str(dinov2.path), "source": dinov2.source}}),
        "device": str(extractor.device),
        "world_size": dist.world_size(),
        "seconds": round(seconds, 3),
        "versions": package_versions(),
    }

