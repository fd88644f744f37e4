"""FD_DINOv2 and DINOv2 precision/recall through the evaluator, the reference cache and the in-job path, against
numpy on the (tiny) network's features; references of statistics only; the protocol object."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from adm_numpy import fid_adm_numpy, manifold_decisions_adm_numpy
from captured import run_captured
from fake_inception import StandInExtractor, write_ref_and_sample

from evaluation import networks
from evaluation.dinov2 import DINOV2_FEATURE, DinoV2Extractor
from evaluation.evaluator import main
from evaluation.features import FeatureAccumulator
from evaluation.networks import FeatureNetworks, features_id, weights_id
from evaluation.report import evaluate
from evaluation.run_metrics import RunEvaluation, check_reference

# More images than the tiny DINOv2's 64 dimensions: full-rank covariances, so scipy's sqrtm is exact.
NUM_REF, NUM_SAMPLE = 72, 68
TINY_METRICS = ["fd_dinov2", "dinov2_prec", "dinov2_recall"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_ref_and_sample(tmp_path_factory.mktemp("fd"), (40, 41, 42, 43), NUM_REF, NUM_SAMPLE, 40)


@pytest.fixture(scope="module")
def dino_features(sets: dict, dinov2_extractor: DinoV2Extractor) -> dict[str, np.ndarray]:
    return {name: dinov2_extractor.extract(sets[name])[DINOV2_FEATURE].double().numpy() for name in ("ref", "sample")}


def expected_dinov2(feats: dict[str, np.ndarray]) -> dict[str, float]:
    ref = feats["ref"]
    sample_on_ref, ref_on_sample = manifold_decisions_adm_numpy(ref, feats["sample"])
    return {"fd_dinov2": fid_adm_numpy(feats["sample"], ref.mean(0), np.cov(ref, rowvar=False)),
            "dinov2_precision": float(sample_on_ref.mean()), "dinov2_recall": float(ref_on_sample.mean())}


def run_main(argv: list[str]) -> tuple[int, str, str]:
    return run_captured(main, argv, "ignore")


@pytest.fixture
def no_inception(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inception must not be loaded: only DINOv2 metrics are asked."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Inception was loaded for DINOv2-only metrics")

    monkeypatch.setattr(networks, "InceptionExtractor", refuse)
    monkeypatch.setattr(networks, "resolve_weights_on_every_rank", refuse)


def test_both_networks_in_one_pass_equal_numpy(sets: dict, stand_in: StandInExtractor,
                                               dinov2_extractor: DinoV2Extractor, dino_features: dict):
    """Inception (a stand-in) and DINOv2 side by side: each metric equals numpy on its own network's features."""
    both = FeatureNetworks([stand_in, dinov2_extractor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(sets["ref_path"], sets["sample_path"], both, ["fid", "prec", *TINY_METRICS], cache_dir=None)
    expected = expected_dinov2(dino_features)
    assert 0 < expected["dinov2_precision"] < 1 and 0 < expected["dinov2_recall"] < 1
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    pool = {name: stand_in.extract(sets[name])["pool"].double().numpy() for name in ("ref", "sample")}
    assert report["fid"] == pytest.approx(fid_adm_numpy(pool["sample"], pool["ref"].mean(0),
                                                        np.cov(pool["ref"], rowvar=False)), rel=1e-6)
    assert report["precision"] == pytest.approx(manifold_decisions_adm_numpy(pool["ref"], pool["sample"])[0].mean())
    protocol = report["protocol"]
    assert set(protocol["networks"]) == {"inception", "dinov2"}
    assert protocol["networks"]["dinov2"]["resize"] == "torch" and protocol["networks"]["dinov2"]["input_side"] == 224
    assert (protocol["samples"]["count"], protocol["reference"]["images"]) == (NUM_SAMPLE, NUM_REF)
    assert report["dinov2_weights"]["source"] == "explicit"


def test_cli_fd_dinov2_only_cache_and_bootstrap(sets: dict, dinov2_file: Path, dino_features: dict,
                                                any_dinov2: None, no_inception: None, tmp_path: Path):
    """`--metrics fd_dinov2,...` loads DINOv2 alone; the reference's DINOv2 part is cached (a file of its own);
    `--bootstrap` gives fd_dinov2_std as numpy's resamples do."""
    cache, out = tmp_path / "cache", tmp_path / "out.json"
    argv = [str(sets["ref_path"]), str(sets["sample_path"]), "--metrics", ",".join(TINY_METRICS), "--dinov2-weights",
            str(dinov2_file), "--device", "cpu", "--cache-dir", str(cache), "--json", str(out), "--bootstrap", "3"]
    rc, stdout, err = run_main(argv)
    assert rc == 0, err
    assert [line.split(": ")[0] for line in stdout.splitlines()] == ["FD_DINOv2", "DINOv2 Precision",
                                                                       "DINOv2 Recall", "FD_DINOv2 bootstrap std"]
    report = json.loads(out.read_text())
    for key, value in expected_dinov2(dino_features).items():
        assert report[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    ref, sample = dino_features["ref"], dino_features["sample"]
    resampled = [fid_adm_numpy(sample[np.random.default_rng([0, k]).integers(0, NUM_SAMPLE, NUM_SAMPLE)],
                               ref.mean(0), np.cov(ref, rowvar=False)) for k in range(3)]
    assert report["fd_dinov2_std"] == pytest.approx(np.std(resampled, ddof=1), rel=1e-5)
    assert report["inception_weights"] is None and "inception" not in report["protocol"]["networks"]
    assert len(list(cache.glob("*.npz"))) == 1
    rc, _, err = run_main(argv)
    assert rc == 0 and json.loads(out.read_text())["reference_statistics"].startswith("cached"), err
    pil = [*argv[:-2], "--dinov2-resize", "pil"]  # another resize: another cache entry, another number
    rc, _, err = run_main(pil)
    assert rc == 0 and len(list(cache.glob("*.npz"))) == 2, err
    assert json.loads(out.read_text())["protocol"]["networks"]["dinov2"]["resize"] == "pil"


def test_statistics_only_reference(sets: dict, dinov2_file: Path, dino_features: dict, any_dinov2: None,
                                   no_inception: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Without DINOv2 statistics: one line before any network is built. With them (per resize mode): used."""
    np.savez(tmp_path / "adm_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    monkeypatch.setattr(networks, "open_networks", lambda *a, **k: pytest.fail("a network was built"))
    base = ["--metrics", "fd_dinov2", "--dinov2-weights", str(dinov2_file), "--device", "cpu", "--no-cache"]
    rc, out, err = run_main([str(tmp_path / "adm_stats.npz"), str(sets["sample_path"]), *base])
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "are needed for FD_DINOv2 (or their statistics mu_dinov2/sigma_dinov2)" in err
    monkeypatch.undo()
    monkeypatch.setattr(networks, "InceptionExtractor", lambda *a, **k: pytest.fail("Inception loaded"))
    from evaluation import dinov2

    monkeypatch.setattr(dinov2, "METRIC_ARCH", None)
    ref = dino_features["ref"]
    shifted = ref + 0.5  # other statistics under the pil names: the resize mode picks the pair
    np.savez(tmp_path / "dino_stats.npz", mu_dinov2=ref.mean(0), sigma_dinov2=np.cov(ref, rowvar=False),
             mu_dinov2_pil=shifted.mean(0), sigma_dinov2_pil=np.cov(shifted, rowvar=False))
    for resize, stats in (("torch", ref), ("pil", shifted)):
        rc, out, err = run_main([str(tmp_path / "dino_stats.npz"), str(sets["sample_path"]), *base,
                                 "--dinov2-resize", resize, "--json", str(tmp_path / "r.json")])
        assert rc == 0, err
        sample = (dino_features["sample"] if resize == "torch" else DinoV2Extractor(
            dinov2.resolve_dinov2_weights(dinov2_file, arch=None), "cpu", 8, "pil").extract(sets["sample"])
            [DINOV2_FEATURE].double().numpy())
        expected = fid_adm_numpy(sample, stats.mean(0), np.cov(stats, rowvar=False))
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["fd_dinov2"] == pytest.approx(expected, rel=1e-6) and report["num_reference"] is None


def test_in_job_metrics_see_each_batch(sets: dict, dinov2_file: Path, dino_features: dict, any_dinov2: None,
                                       tmp_path: Path):
    """RunEvaluation with --dinov2-weights: the sampler's accumulator path gives the evaluator's numbers, and
    the stored features are keyed by both the network and its resize mode."""
    metrics = ",".join(TINY_METRICS)
    reference, chosen = check_reference(sets["ref_path"], metrics)
    evaluation = RunEvaluation.open(reference, chosen, torch.device("cpu"), 16, allow_download=False,
                                    dinov2_weights=str(dinov2_file))
    inputs = evaluation.inputs(tmp_path / "run", NUM_SAMPLE, sets["sample"].shape[1])
    accumulator = evaluation.accumulator(inputs)
    for a in range(0, NUM_SAMPLE, 50):  # as sample_ddp does: extract, then add with the global indices
        images = torch.from_numpy(sets["sample"][a: a + 50])
        accumulator.add_features(evaluation.extractor.extract(images), list(range(a, a + images.shape[0])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluation.report(inputs, accumulator, 0.0)
    for key, value in expected_dinov2(dino_features).items():
        assert report[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert report["protocol"]["samples"]["count"] == NUM_SAMPLE
    assert evaluation.weights_id.startswith("dinov2-torch-") and evaluation.extractor.feature_dims == {"dinov2": 64}


def test_features_id_of_inception_alone_is_unchanged(stand_in: StandInExtractor, dinov2_extractor: DinoV2Extractor):
    """Runs that stored Inception features keep using them; DINOv2 features live in another folder."""
    assert features_id(FeatureNetworks([stand_in])) == weights_id(stand_in.weights)
    both = features_id(FeatureNetworks([stand_in, dinov2_extractor]))
    assert both.startswith(weights_id(stand_in.weights) + "-dinov2-torch-")


def test_accumulator_keeps_dinov2_rows_for_resumes(sets: dict, stand_in: StandInExtractor,
                                                  dinov2_extractor: DinoV2Extractor):
    both = FeatureNetworks([stand_in, dinov2_extractor])
    acc = FeatureAccumulator(both, 6)
    acc.add_images(sets["sample"][:6], 0)
    _, rows = acc.local_rows()
    assert set(rows) == {"pool", "spatial", "logits", "dinov2"} and rows["dinov2"].shape == (6, 64)
