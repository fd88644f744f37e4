"""Two processes (torchrun, gloo): precision/recall decisions, the batch-by-batch accumulator, evaluate() and
the bootstrap against numpy computations of ADM's definitions in this process (stand-in network)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from adm_numpy import adm_report_numpy, bootstrap_std_numpy, is_adm_numpy, manifold_decisions_adm_numpy
from fake_inception import StandInExtractor, write_ref_and_sample

from evaluation.bootstrap import resample_indices

WORKER = Path(__file__).with_name("two_process_worker.py")
NUM_REF, NUM_SAMPLE = 24, 37  # an odd count: the ranks' shares differ
RESAMPLES, SPLIT = 3, 7  # as in the worker
METRIC_KEYS = ("inception_score", "fid", "sfid", "precision", "recall")
STD_KEYS = ("inception_score_std", "fid_std", "sfid_std")


def numpy_features(stand_in: StandInExtractor, images: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in stand_in.extract(images).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, weights_file: Path,
        torchrun: Callable[[list[str]], subprocess.CompletedProcess]) -> dict:
    folder = tmp_path_factory.mktemp("two")
    images = write_ref_and_sample(folder, (11, 12, 13, 14), NUM_REF, NUM_SAMPLE, 20)
    ref, sample = images["ref"], images["sample"]
    rng = np.random.default_rng(6)
    pr = {"ref": rng.standard_normal((300, 64)).astype(np.float32),
          "sample": (rng.standard_normal((250, 64)) * 1.4 + 0.6).astype(np.float32)}
    np.savez(folder / "pr.npz", **pr)
    out = folder / "out.json"
    proc = torchrun([str(WORKER), str(out), str(folder / "ref.npz"), str(folder / "sample.npz"), str(weights_file),
                     str(folder / "pr.npz")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"got": json.loads(out.read_text()), "ref": ref, "sample": sample, "pr": pr}


def test_precision_recall_decisions_equal_adm_numpy(run: dict):
    got = run["got"]
    assert got["world_size"] == 2
    sample_on_ref, ref_on_sample = manifold_decisions_adm_numpy(run["pr"]["ref"], run["pr"]["sample"])
    assert 0 < sample_on_ref.mean() < 1 and 0 < ref_on_sample.mean() < 1
    np.testing.assert_array_equal(got["sample_on_ref"], sample_on_ref)
    np.testing.assert_array_equal(got["ref_on_sample"], ref_on_sample)


def test_accumulator_equals_evaluate_and_numpy(run: dict, weights: object):
    stand_in = StandInExtractor(weights)
    ref, sample = numpy_features(stand_in, run["ref"]), numpy_features(stand_in, run["sample"])
    fed, whole = run["got"]["fed"], run["got"]["evaluate"]
    np.testing.assert_allclose(run["got"]["pool_rows"], sample["pool"], rtol=1e-6)  # gathered in index order
    expected = adm_report_numpy(ref, sample)
    for key in METRIC_KEYS:
        assert fed[key] == pytest.approx(whole[key], rel=1e-5), key
        assert fed[key] == pytest.approx(expected[key], rel=1e-5), key
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1
    assert (fed["precision"], fed["recall"]) == (whole["precision"], whole["recall"])
    spread = bootstrap_std_numpy(ref, sample, RESAMPLES, seed=1)
    for key in STD_KEYS:
        assert fed[key] == pytest.approx(whole[key], rel=1e-5), key
        assert fed[key] == pytest.approx(spread[key], rel=1e-5), key
        assert fed[key] > 0, key


def test_bootstrap_inception_score_splits(run: dict, weights: object):
    """A resample's consecutive splits of 7 (6 splits for 37 images) are weighted across both ranks' images."""
    logits = numpy_features(StandInExtractor(weights), run["sample"])["logits"]
    scores = [is_adm_numpy(logits[resample_indices(NUM_SAMPLE, 2, r)], SPLIT) for r in range(RESAMPLES)]
    assert run["got"]["small_splits"]["inception_score_std"] == pytest.approx(np.std(scores, ddof=1), rel=1e-6)
