"""Run by tests/evaluation/test_two_processes.py under `torchrun --nproc_per_node=2`: precision/recall
decisions, a batch-by-batch accumulator, evaluate() and the bootstrap, with the stand-in network.
Rank 0 writes what it got to the JSON file given as the first argument (arrays as lists)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from fake_inception import StandInExtractor

from evaluation.bootstrap import bootstrap_spread
from evaluation.features import FeatureAccumulator
from evaluation.inception import InceptionWeights
from evaluation.inputs import check_batch
from evaluation.metrics import METRICS
from evaluation.precision_recall import manifold_membership
from evaluation.reference_cache import load_reference
from evaluation.report import evaluate, report_metrics
from launch.runtime import dist

BATCH = 5
RESAMPLES = 3
SPLIT = 7


def main(out: Path, ref: Path, sample: Path, weights: Path, pr_features: Path) -> None:
    dist.init(use_cuda=False)
    rank, world = dist.rank(), dist.world_size()
    stand_in = StandInExtractor(InceptionWeights(weights, "stand-in", has_classifier=True))
    with np.load(pr_features) as z:
        sample_on_ref, ref_on_sample = manifold_membership(z["ref"], z["sample"], device="cpu")
    images = np.load(sample)["arr_0"]
    mine = np.arange(rank, len(images), world)[::-1]  # scattered indices, in reverse, in uneven batches
    accumulator = FeatureAccumulator(stand_in, len(images))
    for a in range(0, len(mine), BATCH):
        idx = mine[a: a + BATCH]
        batch = images[idx] if a % 2 else torch.from_numpy(images[idx])  # numpy and torch inputs
        accumulator.add_images(batch, idx)
    features = accumulator.reduce()
    checked = check_batch(ref, "reference", METRICS, stand_in.feature_dims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = load_reference(checked, METRICS, stand_in, cache_dir=None, chunk_size=BATCH)
        fed = report_metrics(reference, features, METRICS, bootstrap=RESAMPLES, bootstrap_seed=1)
        whole = evaluate(ref, sample, stand_in, METRICS, cache_dir=None, chunk_size=BATCH, bootstrap=RESAMPLES,
                         bootstrap_seed=1)
        small_splits = bootstrap_spread(reference, features, ["is"], RESAMPLES, seed=2, split_size=SPLIT)
    if dist.is_main():
        result = {"world_size": world, "sample_on_ref": sample_on_ref.tolist(), "ref_on_sample": ref_on_sample.tolist(),
                  "fed": fed, "evaluate": {k: v for k, v in whole.items() if k in fed}, "small_splits": small_splits,
                  "pool_rows": features.rows["pool"].tolist()}
        out.write_text(json.dumps(result))
    dist.shutdown()


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:6]))
