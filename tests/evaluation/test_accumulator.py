"""The batch-by-batch API for a sampling job: FeatureAccumulator + report_metrics give evaluate()'s
numbers and numpy's; features stored by an interrupted run are added without the network; --bootstrap."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from adm_numpy import adm_report_numpy, bootstrap_std_numpy, is_adm_numpy
from captured import run_captured
from fake_inception import StandInExtractor, write_ref_and_sample

from evaluation.bootstrap import resample_indices
from evaluation.errors import EvaluationError
from evaluation.evaluator import main
from evaluation.features import FEATURES, FeatureAccumulator
from evaluation.inception import InceptionExtractor
from evaluation.inputs import check_batch
from evaluation.metrics import METRICS
from evaluation.reference_cache import Reference, load_reference
from evaluation.report import evaluate, report_metrics

NUM_REF, NUM_SAMPLE = 24, 30
METRIC_KEYS = ("inception_score", "fid", "sfid", "precision", "recall")


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_ref_and_sample(tmp_path_factory.mktemp("acc"), (25, 26, 27, 28), NUM_REF, NUM_SAMPLE, 18)


def fed_in_pieces(accumulator: FeatureAccumulator, images: np.ndarray, seed: int) -> None:
    """Shuffled indices in batches of 1..7 images, as numpy arrays and as torch tensors."""
    order = np.random.default_rng(seed).permutation(len(images))
    a, sizes = 0, [3, 7, 1, 5, 2, 6, 4]
    for i, size in enumerate(sizes * 3):
        idx = order[a: a + size]
        if not len(idx):
            break
        accumulator.add_images(images[idx] if i % 2 else torch.from_numpy(images[idx]), torch.from_numpy(idx))
        a += size


def reference_for(path: Path, stand_in: StandInExtractor) -> Reference:
    checked = check_batch(path, "reference", METRICS, stand_in.feature_dims)
    return load_reference(checked, METRICS, stand_in, cache_dir=None, chunk_size=4)


def test_accumulated_report_equals_evaluate_and_numpy(batches: dict, stand_in: StandInExtractor):
    accumulator = FeatureAccumulator(stand_in, NUM_SAMPLE)
    fed_in_pieces(accumulator, batches["sample"], seed=0)
    assert accumulator.count == NUM_SAMPLE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fed = report_metrics(reference_for(batches["ref_path"], stand_in), accumulator.reduce(), METRICS)
        whole = evaluate(batches["ref_path"], batches["sample_path"], stand_in, cache_dir=None, chunk_size=8)
    features = {name: {k: v.double().numpy() for k, v in stand_in.extract(batches[name]).items()}
                for name in ("ref", "sample")}
    expected = adm_report_numpy(features["ref"], features["sample"])
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1
    for key in METRIC_KEYS:
        assert fed[key] == pytest.approx(whole[key], rel=1e-5), key
        assert fed[key] == pytest.approx(expected[key], rel=1e-5), key
    assert (fed["precision"], fed["recall"]) == (whole["precision"], whole["recall"])


def test_stored_features_are_added_without_the_network(batches: dict, stand_in: StandInExtractor):
    """A resumed sampling job adds the features it stored beside its images; only new images are extracted."""
    first = FeatureAccumulator(stand_in, NUM_SAMPLE)
    first.add_images(batches["sample"][:20], 0)
    stored_idx, stored = first.local_rows()  # what an interrupted run would have written
    assert set(stored) == set(FEATURES) and stored_idx.tolist() == list(range(20))
    resumed = FeatureAccumulator(stand_in, NUM_SAMPLE)
    resumed.add_features(stored, stored_idx)
    calls = stand_in.calls
    resumed.add_images(batches["sample"][20:], 20)
    assert stand_in.calls - calls == NUM_SAMPLE - 20
    once = FeatureAccumulator(stand_in, NUM_SAMPLE)
    once.add_images(batches["sample"], 0)
    got, expected = resumed.reduce(), once.reduce()
    for kind in FEATURES:
        torch.testing.assert_close(got.rows[kind], expected.rows[kind], rtol=0, atol=0)
    np.testing.assert_allclose(got.pool.cov(), expected.pool.cov(), rtol=1e-10)
    assert got.inception.score() == pytest.approx(expected.inception.score(), rel=1e-12)


def test_missing_or_repeated_images_are_named(batches: dict, stand_in: StandInExtractor):
    accumulator = FeatureAccumulator(stand_in, 6)
    accumulator.add_images(batches["sample"][:4], [0, 1, 2, 2])
    with pytest.raises(EvaluationError, match="6 images expected: 3 missing, 1 repeated"):
        accumulator.reduce()
    with pytest.raises(EvaluationError, match=r"2 images given with \(3,\) indices"):
        accumulator.add_images(batches["sample"][:2], [0, 1, 2])


def test_accumulator_keeps_the_real_networks_features(extractor: InceptionExtractor, sample_images: np.ndarray,
                                                      features: dict[str, dict[str, np.ndarray]]):
    """pool_3, the sFID spatial features and the logits of each image, from a torch uint8 batch."""
    accumulator = FeatureAccumulator(extractor, len(sample_images))
    accumulator.add_images(torch.from_numpy(sample_images[::-1].copy()), np.arange(len(sample_images))[::-1])
    rows = accumulator.reduce().rows
    assert set(rows) == {"pool", "spatial", "logits"}
    for kind, expected in features["sample"].items():
        np.testing.assert_allclose(rows[kind].double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_bootstrap_spread_equals_numpy_resamples(batches: dict, stand_in: StandInExtractor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(batches["ref_path"], batches["sample_path"], stand_in, ["is", "fid", "sfid"], cache_dir=None,
                          bootstrap=4, bootstrap_seed=3)
    features = {name: {k: v.double().numpy() for k, v in stand_in.extract(batches[name]).items()}
                for name in ("ref", "sample")}
    expected = bootstrap_std_numpy(features["ref"], features["sample"], 4, seed=3)
    for key, value in expected.items():
        assert value > 0 and report[key] == pytest.approx(value, rel=1e-6), key
    assert report["bootstrap"] == {"resamples": 4, "seed": 3}


def test_bootstrap_flag(tmp_path: Path, batch_files: tuple[Path, Path], weights_file: Path,
                        features: dict[str, dict[str, np.ndarray]]):
    """`--bootstrap K` on the real network (IS only: no 2048-d linear algebra): the std line and JSON key."""
    argv = [*map(str, batch_files), "--metrics", "is", "--bootstrap", "3", "--bootstrap-seed", "5",
            "--json", str(tmp_path / "r.json"), "--inception-weights", str(weights_file), "--device", "cpu"]
    rc, out, err = run_captured(main, argv)
    assert rc == 0, err
    logits = features["sample"]["logits"]
    scores = [is_adm_numpy(logits[resample_indices(len(logits), 5, r)]) for r in range(3)]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["inception_score_std"] == pytest.approx(np.std(scores, ddof=1), rel=1e-5)
    assert out.splitlines() == [f"Inception Score: {report['inception_score']}",
                                           f"Inception Score bootstrap std: {report['inception_score_std']}"]
