"""evaluation.evaluator end to end: ADM lines, numbers vs numpy and torch-fidelity, reference handling,
the reference cache, bad inputs, and 1 vs 2 processes."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from adm_numpy import fid_adm_numpy, is_adm_numpy
from captured import run_captured
from fake_inception import StandInExtractor
from PIL import Image
from scipy.spatial.distance import cdist
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from evaluation import reference_cache
from evaluation import report as report_module
from evaluation.errors import EvaluationError
from evaluation.evaluator import main
from evaluation.inception import InceptionExtractor
from evaluation.inputs import check_batch
from evaluation.reference_cache import load_reference
from evaluation.report import evaluate
from evaluation.statistics import InceptionScoreSums
from launch.runtime import dist

ADM_LINES = ["Inception Score", "FID", "sFID", "Precision", "Recall"]


# --------------------------------------------------------------------------------------------- references


def fid_low_rank(x1: np.ndarray, x2: np.ndarray, mu2: np.ndarray | None = None,
                 var2: np.ndarray | None = None) -> float:
    """FID of feature sets, in closed form for n << d (no sqrtm).

    With centred X1, X2 and S = Xc^T Xc / (n-1): the non-zero eigenvalues of S1 S2 are the squared singular
    values of X1c X2c^T / sqrt((n1-1)(n2-1)), so Tr sqrt(S1 S2) is that matrix's nuclear norm. When the second
    set is given as mean `mu2` and a diagonal covariance `var2`, Tr sqrt(S1 D) = ||X1c D^1/2||_* / sqrt(n1-1).
    """
    x1 = x1.astype(np.float64)
    c1 = x1 - x1.mean(0)
    tr1 = (c1 ** 2).sum() / (len(x1) - 1)
    if var2 is None:
        x2 = x2.astype(np.float64)
        mu2, c2 = x2.mean(0), x2 - x2.mean(0)
        tr2 = (c2 ** 2).sum() / (len(x2) - 1)
        cross = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((len(x1) - 1) * (len(x2) - 1))
    else:
        tr2 = var2.sum()
        cross = np.linalg.svd(c1 * np.sqrt(var2), compute_uv=False).sum() / np.sqrt(len(x1) - 1)
    diff = x1.mean(0) - mu2
    return float(diff @ diff + tr1 + tr2 - 2 * cross)



def pr_brute_force(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    d_rs = cdist(ref, sample)
    r_ref = np.sort(cdist(ref, ref), axis=1)[:, k]
    r_sample = np.sort(cdist(sample, sample), axis=1)[:, k]
    return float((d_rs <= r_ref[:, None]).any(0).mean()), float((d_rs <= r_sample[None, :]).any(1).mean())


class UInt8Images(torch.utils.data.Dataset):
    """torch-fidelity input: uint8 CHW tensors."""

    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    return run_captured(main, argv, "always")


@pytest.fixture
def spy_extractions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The labels of the batches run through Inception (reference and sample passes)."""
    labels: list[str] = []
    real = report_module.extract_batch

    def spy(batch: object, accumulator: object, chunk_size: int, label: str) -> object:
        labels.append(label)
        return real(batch, accumulator, chunk_size, label)

    monkeypatch.setattr(report_module, "extract_batch", spy)
    monkeypatch.setattr(reference_cache, "extract_batch", spy)
    return labels


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, batch_files: tuple[Path, Path],
            weights_file: Path) -> dict:
    folder = tmp_path_factory.mktemp("cli")
    ref, sample = batch_files
    argv = [str(ref), str(sample), "--json", str(folder / "out.json"), "--inception-weights", str(weights_file),
            "--device", "cpu", "--batch-size", "8", "--cache-dir", str(folder / "cache")]
    rc, out, err = run_main(argv)
    assert rc == 0, err
    return {"stdout": out, "stderr": err, "json": json.loads((folder / "out.json").read_text()),
            "cache": folder / "cache"}


# --------------------------------------------------------------------------------------------- tests


def test_cli_prints_adm_lines(cli_run: dict):
    lines = cli_run["stdout"].strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == ADM_LINES
    report = cli_run["json"]
    for line, key in zip(lines, ["inception_score", "fid", "sfid", "precision", "recall"]):
        assert float(line.split(": ")[1]) == report[key]
    assert report["num_samples"] == 8 and report["num_reference"] == 8
    assert report["inception_weights"]["source"] == "explicit"
    assert {"torch", "torch_fidelity", "numpy"} <= set(report["versions"])


def test_metrics_match_numpy(cli_run: dict, features: dict[str, dict[str, np.ndarray]]):
    report, ref, sample = cli_run["json"], features["ref"], features["sample"]
    assert report["fid"] == pytest.approx(fid_low_rank(sample["pool"], ref["pool"]), rel=1e-4)
    assert report["sfid"] == pytest.approx(fid_low_rank(sample["spatial"], ref["spatial"]), rel=1e-4)
    assert report["inception_score"] == pytest.approx(is_adm_numpy(sample["logits"]), rel=1e-5)
    assert report["inception_score"] > 1.05  # the locally made classifier separates the images
    expected_pr = pr_brute_force(ref["pool"], sample["pool"])
    assert 0 < expected_pr[0] < 1 and 0 < expected_pr[1] < 1
    assert (report["precision"], report["recall"]) == pytest.approx(expected_pr)


def test_fid_and_is_match_torch_fidelity(cli_run: dict, weights_file: Path, ref_images: np.ndarray,
                                         sample_images: np.ndarray):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        theirs = torch_fidelity.calculate_metrics(
            input1=UInt8Images(sample_images), input2=UInt8Images(ref_images), fid=True, cuda=False,
            feature_extractor_weights_path=str(weights_file), verbose=False, cache=False)
    fid = theirs["frechet_inception_distance"]
    assert cli_run["json"]["fid"] == pytest.approx(fid, rel=1e-3)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"],
                                      feature_extractor_weights_path=str(weights_file))
    with torch.no_grad():
        (logits,) = net(UInt8Images(sample_images).images)
    expected = is_adm_numpy(logits.numpy())
    # Our Inception Score code on torch-fidelity's logits = the numpy ADM definition.
    sums = InceptionScoreSums(len(logits), logits.shape[1])
    sums.update(logits.numpy(), 0)
    assert sums.score() == pytest.approx(expected, rel=1e-6)
    # End to end (our channels-last float32 extraction vs torch-fidelity's NCHW one): float32 round-off in the
    # logits, magnified by the test classifier's large weights, is ~1e-6 of IS.
    assert cli_run["json"]["inception_score"] == pytest.approx(expected, rel=1e-5)


def test_reference_cache_skips_extraction(cli_run: dict, batch_files: tuple[Path, Path],
                                          extractor: InceptionExtractor, spy_extractions: list[str]):
    ref, sample = batch_files
    assert len(list(cli_run["cache"].glob("*.npz"))) == 1
    report = evaluate(ref, sample, extractor, ["prec", "recall"], cache_dir=cli_run["cache"])
    assert len(spy_extractions) == 1 and spy_extractions[0].startswith("samples")
    assert report["reference_statistics"].startswith("cached")
    assert report["precision"] == cli_run["json"]["precision"] and report["recall"] == cli_run["json"]["recall"]


def test_statistics_stored_in_the_sample_file_are_used_as_adm_does(tmp_path: Path, extractor: InceptionExtractor,
                                                                    features: dict[str, dict[str, np.ndarray]],
                                                                    ref_images: np.ndarray, sample_images: np.ndarray):
    """ADM's read_statistics takes mu/sigma (mu_s/sigma_s) from the sample .npz when present."""
    ref_pool, ref_spatial = features["ref"]["pool"], features["ref"]["spatial"]
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=ref_images, mu=ref_pool.mean(0), sigma=np.cov(ref_pool, rowvar=False),
             mu_s=ref_spatial.mean(0), sigma_s=np.cov(ref_spatial, rowvar=False))
    shifted = tmp_path / "sample_with_stats.npz"  # the reference's statistics, the pool mean moved by 0.1
    np.savez(shifted, arr_0=sample_images, mu=ref_pool.mean(0) + 0.1, sigma=np.cov(ref_pool, rowvar=False),
             mu_s=ref_spatial.mean(0), sigma_s=np.cov(ref_spatial, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(ref, shifted, extractor, ["fid", "sfid"], cache_dir=None)
    assert report["sample_statistics"] == "given in the file"
    assert report["fid"] == pytest.approx(2048 * 0.1**2, rel=1e-6)  # only the means differ
    # identical statistics: 0 up to the round-off of the square-root trace (relative to the traces it cancels)
    assert report["sfid"] == pytest.approx(0.0, abs=1e-6 * 2 * np.trace(np.cov(ref_spatial, rowvar=False)))


def test_precomputed_reference_statistics_are_used(tmp_path: Path, extractor: InceptionExtractor,
                                                   features: dict[str, dict[str, np.ndarray]],
                                                   ref_images: np.ndarray, sample_images: np.ndarray,
                                                   spy_extractions: list[str]):
    rng = np.random.default_rng(0)
    given = {"mu": features["ref"]["pool"].mean(0) + 0.05, "sigma": np.diag(rng.uniform(0.0, 1e-3, 2048)),
             "mu_s": rng.uniform(0, 1, 2023), "sigma_s": np.diag(rng.uniform(0.0, 1e-2, 2023))}
    ref = tmp_path / "adm_ref.npz"
    np.savez(ref, arr_0=ref_images[:4], **given)  # ADM layout; arr_0 only serves precision/recall
    checked = check_batch(ref, "reference", {"fid", "sfid"}, extractor.feature_dims)
    reference = load_reference(checked, {"fid", "sfid"}, extractor, cache_dir=None, chunk_size=4)
    assert spy_extractions == []  # nothing to extract: both statistics are given
    for kind, (mu, sigma) in (("pool", ("mu", "sigma")), ("spatial", ("mu_s", "sigma_s"))):
        got = reference.statistics[kind]
        np.testing.assert_array_equal(got[0], given[mu])
        np.testing.assert_array_equal(got[1], given[sigma])
    sample = tmp_path / "sample4.npz"
    np.savez(sample, arr_0=sample_images[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(ref, sample, extractor, ["fid"], cache_dir=None)
    assert spy_extractions == [f"samples {sample}"]  # the reference was not run through Inception
    assert report["reference_statistics"] == "given in the file"
    pool = features["sample"]["pool"][:4]
    assert report["fid"] == pytest.approx(fid_low_rank(pool, None, given["mu"], np.diag(given["sigma"])), rel=1e-4)
    assert report["fid"] != pytest.approx(fid_low_rank(pool, features["ref"]["pool"][:4]), rel=1e-2)


def test_mismatched_resolution_warns_and_proceeds(tmp_path: Path, extractor: InceptionExtractor,
                                                  sample_images: np.ndarray, features: dict):
    ref = tmp_path / "ref16.npz"
    np.savez(ref, arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    sample = tmp_path / "sample.npz"
    np.savez(sample, arr_0=sample_images[:4])
    with pytest.warns(UserWarning, match="reference is 16x16 but samples are 32x32"):
        report = evaluate(ref, sample, extractor, ["is"], cache_dir=None)
    assert report["inception_score"] == pytest.approx(is_adm_numpy(features["sample"]["logits"][:4]), rel=1e-5)


def _bad_inputs(folder: Path, good: Path) -> dict[str, tuple[list[str], str]]:
    images = np.zeros((4, 8, 8, 3), np.uint8)
    cases: dict[str, tuple[list[str], str]] = {}
    np.savez(folder / "no_arr0.npz", images=images)
    cases["missing arr_0"] = ([str(folder / "no_arr0.npz"), str(good)], "no arr_0")
    np.savez(folder / "float.npz", arr_0=images.astype(np.float32))
    cases["dtype"] = ([str(good), str(folder / "float.npz")], "dtype float32")
    np.savez(folder / "gray.npz", arr_0=images[..., :1])
    cases["channels"] = ([str(good), str(folder / "gray.npz")], "1 channels")
    np.savez(folder / "nchw.npz", arr_0=images.transpose(0, 3, 1, 2))
    cases["nchw"] = ([str(good), str(folder / "nchw.npz")], "NCHW")
    np.savez(folder / "one.npz", arr_0=images[:1])
    cases["one image"] = ([str(good), str(folder / "one.npz")], "at least 2")
    (folder / "empty").mkdir()
    cases["empty folder"] = ([str(good), str(folder / "empty")], "no .png")
    np.savez(folder / "full.npz", arr_0=np.zeros((50, 8, 8, 3), np.uint8))
    (folder / "truncated.npz").write_bytes((folder / "full.npz").read_bytes()[:5000])
    cases["truncated"] = ([str(good), str(folder / "truncated.npz")], "truncated")
    cases["missing file"] = ([str(good), str(folder / "nope.npz")], "does not exist")
    cases["bad metrics"] = ([str(good), str(good), "--metrics", "fid,kid"], "unknown kid")
    return cases


def test_bad_inputs_give_one_error_line(tmp_path: Path, batch_files: tuple[Path, Path]):
    good = batch_files[0]
    for name, (argv, fragment) in _bad_inputs(tmp_path, good).items():
        rc, out, err = run_main([*argv, "--no-cache", "--no-download"])
        lines = err.strip().splitlines()
        assert rc == 2, name
        assert out == "", name
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (name, err)


# --------------------------------------------------------------------------------------------- fail fast

FAIL_FAST_S = 10  # "within seconds" on a loaded 2-core machine: a bad input costs no Inception pass


@pytest.fixture
def inception_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the batches the real network is asked to extract."""
    calls: list[int] = []
    real = InceptionExtractor.extract

    def counting(self: InceptionExtractor, images: np.ndarray) -> dict[str, torch.Tensor]:
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(InceptionExtractor, "extract", counting)
    return calls


def _write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


def _late_failures(folder: Path, ref: Path, sample: Path, sample_images: np.ndarray) -> dict[str, tuple[list, str]]:
    """Inputs that used to fail only after the Inception pass."""
    cases: dict[str, tuple[list, str]] = {}
    np.savez(folder / "ref3.npz", arr_0=sample_images[:3])
    cases["too few for precision/recall"] = ([str(folder / "ref3.npz"), str(sample)], "more than 3 reference")
    cases["--json folder missing"] = ([str(ref), str(sample), "--json", str(folder / "nope" / "r.json")],
                                      "--json")
    cases["--json is a folder"] = ([str(ref), str(sample), "--json", str(folder)], "is a folder")
    mu = np.zeros(2048)
    mu[5] = np.nan
    np.savez(folder / "nan_mu.npz", arr_0=sample_images, mu=mu, sigma=np.eye(2048))
    cases["NaN in mu"] = ([str(folder / "nan_mu.npz"), str(sample), "--metrics", "fid"], "mu contains NaN")
    pngs = _write_pngs(folder / "pngs", sample_images)
    Image.fromarray(sample_images[0, :16, :16]).save(pngs / "000008.png")
    cases["one PNG of another size"] = ([str(ref), str(pngs)], "000008.png is 16x16")
    np.savez(folder / "stats_only.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023))
    cases["statistics only, precision asked"] = ([str(folder / "stats_only.npz"), str(sample)],
                                                 "are needed for Precision, Recall; with these statistics use "
                                                 "--metrics fid,sfid")
    (folder / "weights.txt").write_text("these are not weights\n")
    cases["text file as weights"] = ([str(ref), str(sample), "--inception-weights", str(folder / "weights.txt")],
                                     "--inception-weights")
    cases["--bootstrap 1"] = ([str(ref), str(sample), "--bootstrap", "1"], "--bootstrap 1")
    return cases


def test_bad_inputs_fail_before_any_inception_work(tmp_path: Path, batch_files: tuple[Path, Path],
                                                   sample_images: np.ndarray, weights_file: Path,
                                                   inception_calls: list[int]):
    ref, sample = batch_files
    for name, (argv, fragment) in _late_failures(tmp_path, ref, sample, sample_images).items():
        t0 = time.perf_counter()
        rc, out, err = run_main(["--inception-weights", str(weights_file), "--device", "cpu", "--no-cache", *argv])
        lines = err.strip().splitlines()
        assert rc == 2 and out == "", (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (name, err)
        assert inception_calls == [] and time.perf_counter() - t0 < FAIL_FAST_S, name
    assert not list(tmp_path.glob("**/*.json"))


def test_text_weights_name_the_flag(tmp_path: Path, batch_files: tuple[Path, Path]):
    text = tmp_path / "weights.txt"
    text.write_text("101 not a checkpoint")
    rc, _, err = run_main([*map(str, batch_files), "--inception-weights", str(text), "--device", "cpu"])
    assert rc == 2 and err.startswith(f"error: --inception-weights {text} is not a PyTorch weights file")
    assert "KeyError" not in err and len(err.strip().splitlines()) == 1


def test_report_names_work_as_metrics(cli_run: dict, batch_files: tuple[Path, Path], weights_file: Path):
    """`--metrics precision,recall` (the report's keys) = `prec,recall`; the reference comes from the cache."""
    rc, out, err = run_main([*map(str, batch_files), "--metrics", "recall,precision", "--inception-weights",
                             str(weights_file), "--device", "cpu", "--cache-dir", str(cli_run["cache"])])
    assert rc == 0, err
    assert out.splitlines() == [f"Precision: {cli_run['json']['precision']}", f"Recall: {cli_run['json']['recall']}"]


def test_statistics_only_reference_serves_fid_and_sfid(tmp_path: Path, stand_in: StandInExtractor,
                                                       ref_images: np.ndarray, sample_images: np.ndarray):
    """FID and sFID need only mu/sigma (mu_s/sigma_s) of the reference."""
    ref_feats = {k: v.double().numpy() for k, v in stand_in.extract(ref_images).items()}
    rng = np.random.default_rng(3)
    stats = {"mu": ref_feats["pool"].mean(0), "sigma": np.diag(rng.uniform(0.5, 1.0, 16)),
             "mu_s": ref_feats["spatial"].mean(0), "sigma_s": np.diag(rng.uniform(0.5, 1.0, 12))}
    ref, sample = tmp_path / "stats.npz", tmp_path / "sample.npz"
    np.savez(ref, **stats)
    np.savez(sample, arr_0=sample_images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(ref, sample, stand_in, ["fid", "sfid"], cache_dir=None)
    feats = {k: v.double().numpy() for k, v in stand_in.extract(sample_images).items()}
    assert report["fid"] == pytest.approx(fid_adm_numpy(feats["pool"], stats["mu"], stats["sigma"]), rel=1e-6)
    assert report["sfid"] == pytest.approx(fid_adm_numpy(feats["spatial"], stats["mu_s"], stats["sigma_s"]), rel=1e-6)
    assert report["num_reference"] is None and report["reference_statistics"] == "given in the file"
    with pytest.raises(EvaluationError, match=r"the reference images \(arr_0\) are needed for Precision;"):
        evaluate(ref, sample, stand_in, ["fid", "precision"], cache_dir=None)


def test_one_and_two_processes_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_file: Path,
                                     extractor: InceptionExtractor, ref_images: np.ndarray, sample_images: np.ndarray,
                                     torchrun: Callable[[list[str]], subprocess.CompletedProcess]):
    ref, sample = tmp_path / "ref6.npz", tmp_path / "sample6.npz"
    # Given (positive definite) reference statistics keep the float64 linear algebra short; the sample's
    # statistics, IS and both feature sets for precision/recall still come from the sharded extraction.
    rng = np.random.default_rng(0)
    given = {"mu": rng.uniform(0, 1, 2048), "sigma": np.diag(rng.uniform(1e-4, 1e-3, 2048))}
    np.savez(ref, arr_0=ref_images[:6], **given)
    np.savez(sample, arr_0=sample_images[:6])
    out = tmp_path / "two.json"
    proc = torchrun(["-m", "evaluation.evaluator", str(ref), str(sample), "--json", str(out), "--device", "cpu",
                     "--inception-weights", str(weights_file), "--batch-size", "3", "--no-cache",
                     "--metrics", "is,fid,prec,recall"])  # sFID shares FID's code path; each costs seconds of eigvalsh
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line.split(": ")[0] for line in proc.stdout.strip().splitlines()]
    assert printed == ["Inception Score", "FID", "Precision", "Recall"]  # once, by rank 0
    two = json.loads(out.read_text())
    assert two["world_size"] == 2
    # One process with one CPU thread, as each rank: the same kernels and per-forward batches, the same floats.
    threads = torch.get_num_threads()
    monkeypatch.setenv("DIT_CPU_THREADS", "1")
    dist.shutdown()
    dist.init(use_cuda=False)  # sets the thread count from DIT_CPU_THREADS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one = evaluate(ref, sample, extractor, ["is", "fid", "prec", "recall"], cache_dir=None, chunk_size=3)
    finally:
        dist.shutdown()
        torch.set_num_threads(threads)
    for key in ["inception_score", "fid", "precision", "recall"]:
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
