"""sample_ddp.py --ref: the metrics computed in the sampling job equal the evaluator's on the same images,
across --save modes, world sizes, a SIGKILL and resumes with another reference or other Inception weights.

Inception is torch-fidelity's network with locally made random weights (tests/fake_inception.py): the real
architecture, 8x8 images upsampled to 299x299, ~0.2 s per image on one CPU thread.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_inception import make_random_inception_state

import sample_ddp
from evaluation.inception import InceptionExtractor, InceptionWeights
from evaluation.report import evaluate
from launch.runtime.errors import UserError
from sampling.options import config_from_args

N = 16
STEPS = 60
SHARD = 2  # images per block and rank: 8 feature blocks for 16 images
FLOATS = ("fid", "sfid", "inception_score")
RATIOS = ("precision", "recall")
# With 16 images the 2048-d covariances are singular and each Frechet distance takes two 2048x2048 eigen-
# solves (seconds; a minute on a loaded CPU): the resume tests check IS, precision and recall, which use every
# image's logits and pool_3 row, so a missing, repeated or stale feature changes them.
ALL = "is,fid,sfid,prec,recall"
CHEAP = "is,prec,recall"
SLOW_S = 600  # a run with FID and sFID on a loaded CPU
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two Inception weight files and two 8x8 reference batches."""
    base = tmp_path_factory.mktemp("eval-inputs")
    out = {"weights": base / "inception-a.pth", "weights2": base / "inception-b.pth",
           "ref": base / "ref.npz", "ref2": base / "ref2.npz", "cache": base / "cache"}
    torch.save(make_random_inception_state(0), out["weights"])
    torch.save(make_random_inception_state(1), out["weights2"])
    rng = np.random.default_rng(5)
    for key in ("ref", "ref2"):
        np.savez(out[key], arr_0=rng.integers(0, 256, (N, 8, 8, 3), dtype=np.uint8))
    return out


def eval_args(files: dict[str, Path], ref: str = "ref", weights: str = "weights", metrics: str = CHEAP) -> list[str]:
    return ["--ref", str(files[ref]), "--inception-weights", str(files[weights]), "--metrics", metrics,
            "--eval-cache-dir", str(files["cache"]), "--shard-size", str(SHARD)]


def run_dir_of(sample_dir: Path) -> Path:
    (run,) = [p for p in sample_dir.iterdir() if p.is_dir()]
    return run


def metrics_of(sample_dir: Path) -> dict:
    return json.loads(Path(f"{run_dir_of(sample_dir)}.metrics.json").read_text())


def assert_same_metrics(got: dict, expected: dict) -> None:
    """FID, sFID and IS within 1e-5 relative; precision and recall within one image (1/N): those both hold."""
    shared = [key for key in (*FLOATS, *RATIOS) if got.get(key) is not None and expected.get(key) is not None]
    assert "inception_score" in shared or "fid" in shared, (got, expected)
    for key in shared:
        if key in FLOATS:
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
        else:
            assert abs(got[key] - expected[key]) <= 1 / N + 1e-12, key


def features_line(stdout: str) -> tuple[int, int, int]:
    m = re.search(r"features \(\S+\): (\d+) of \d+ stored, (\d+) to extract from stored images, (\d+) with", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def in_process_report(files: dict[str, Path], ref: str, weights: str, npz: Path, metrics: str) -> dict:
    extractor = InceptionExtractor(InceptionWeights(files[weights], "explicit", True), "cpu", batch_size=8)
    return evaluate(files[ref], npz, extractor, metrics.split(","), cache_dir=None)


@pytest.fixture(scope="module")
def npz_run(sampler, files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("npz-run")
    result = sampler.run(1, sampler.pixel_args(out, N, 4, "--save", "npz", *eval_args(files, metrics=ALL),
                                               steps=STEPS), timeout=SLOW_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def png_run(sampler, files, tmp_path_factory) -> Path:
    """Two ranks, the default --save png, another batch size."""
    out = tmp_path_factory.mktemp("png-run")
    result = sampler.run(2, sampler.pixel_args(out, N, 3, *eval_args(files, metrics=ALL), steps=STEPS), timeout=SLOW_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_metrics_equal_the_evaluator_on_the_assembled_npz(npz_run, files, tmp_path):
    run = run_dir_of(npz_run)
    npz = Path(f"{run}.npz")
    report = metrics_of(npz_run)
    assert not list(run.glob("*.png"))[1:] and (run / "grid.png").exists()  # only the grid: no PNG per image
    assert len(list((run / "images").glob("*.npz"))) == N // 4  # one shard per batch of 4 (--shard-size 2)
    (features,) = run.glob("features-*")
    assert len(list(features.glob("*.npz"))) == N // 4
    out = tmp_path / "evaluator.json"
    env = {**os.environ, "DIT_CPU_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "evaluation.evaluator", str(files["ref"]), str(npz), "--json",
                           str(out), "--inception-weights", str(files["weights"]), "--no-cache"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=SLOW_S)
    assert proc.returncode == 0, proc.stderr
    expected = json.loads(out.read_text())
    assert_same_metrics(report, expected)
    assert set(expected) <= set(report)  # the evaluator's keys, plus the inputs
    assert report["sample_batch"] == str(npz.resolve()) and report["reference_batch"] == str(files["ref"].resolve())
    assert report["num_samples"] == N and 0 < report["fid"] and 1 < report["inception_score"]


def test_two_ranks_with_pngs_give_the_same_images_and_metrics(png_run, npz_run):
    """PNGs packed (2 ranks, batch 3) and shards assembled (1 rank, batch 4) hold the same bytes."""
    a, b = Path(f"{run_dir_of(png_run)}.npz"), Path(f"{run_dir_of(npz_run)}.npz")
    assert a.read_bytes() == b.read_bytes()
    assert len(list(run_dir_of(png_run).glob("[0-9]*.png"))) == N
    assert_same_metrics(metrics_of(png_run), metrics_of(npz_run))
    assert metrics_of(png_run)["world_size"] == 2


def test_sigkill_of_a_rank_then_resume_gives_the_uninterrupted_metrics(sampler, files, png_run, npz_run, tmp_path):
    args = sampler.pixel_args(tmp_path, N, 2, "--save", "npz", *eval_args(files), steps=STEPS)
    proc = sampler.start(2, args)
    try:
        sampler.wait_for_files(tmp_path, "*/features-*/*.npz", 1)
        workers = sampler.worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    run = run_dir_of(tmp_path)
    blocks = sum(int(p.name.rsplit("-", 1)[1][:-4]) for p in run.glob("features-*/*.npz"))
    assert 0 < blocks < N, "the run finished before it was killed; make it longer"

    resumed = sampler.run(2, args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    stored, extract, sample = features_line(resumed.stdout)
    assert stored == blocks and stored + extract + sample == N  # only the images without features: no repeats
    assert_same_metrics(metrics_of(tmp_path), metrics_of(png_run))
    assert Path(f"{run}.npz").read_bytes() == Path(f"{run_dir_of(npz_run)}.npz").read_bytes()


def test_save_none_keeps_no_image_files_and_the_same_metrics(sampler, files, npz_run, tmp_path):
    result = sampler.run(1, sampler.pixel_args(tmp_path, N, 4, "--save", "none", *eval_args(files), steps=STEPS))
    assert result.returncode == 0, result.stderr
    run = run_dir_of(tmp_path)
    assert not list(tmp_path.glob("*.npz")) and [p.name for p in run.glob("*.png")] == ["grid.png"]
    assert_same_metrics(metrics_of(tmp_path), metrics_of(npz_run))
    assert metrics_of(tmp_path)["sample_batch"] is None


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = Path(shutil.copytree(source, tmp_path / "copy"))
    for stale in out.glob("*.metrics.json"):
        stale.unlink()
    return out


def test_another_ref_recomputes_the_metrics_from_the_stored_features(sampler, files, npz_run, tmp_path):
    sample_dir = copy_run(npz_run, tmp_path)
    result = sampler.run(1, sampler.pixel_args(sample_dir, N, 4, "--save", "npz",
                                               *eval_args(files, ref="ref2", metrics="fid"), steps=STEPS),
                         timeout=SLOW_S)
    assert result.returncode == 0, result.stderr
    assert f"{N} of {N} images present, 0 to sample" in result.stdout
    assert features_line(result.stdout) == (N, 0, 0)  # nothing sampled, nothing extracted again
    expected = in_process_report(files, "ref2", "weights", Path(f"{run_dir_of(npz_run)}.npz"), "fid")
    assert_same_metrics(metrics_of(sample_dir), expected)
    assert metrics_of(sample_dir)["fid"] != pytest.approx(metrics_of(npz_run)["fid"], rel=1e-3)


def test_other_inception_weights_extract_again_never_mix(sampler, files, npz_run, tmp_path):
    sample_dir = copy_run(npz_run, tmp_path)
    result = sampler.run(1, sampler.pixel_args(sample_dir, N, 4, "--save", "npz",
                                               *eval_args(files, weights="weights2"), steps=STEPS))
    assert result.returncode == 0, result.stderr
    assert features_line(result.stdout) == (0, N, 0)  # read back from the shards, not sampled again
    assert len(list(run_dir_of(sample_dir).glob("features-*"))) == 2  # the first weights' blocks stay apart
    expected = in_process_report(files, "ref", "weights2", Path(f"{run_dir_of(npz_run)}.npz"), CHEAP)
    assert_same_metrics(metrics_of(sample_dir), expected)


def test_a_png_lost_after_its_features_is_sampled_and_its_block_redone(sampler, files, png_run, tmp_path):
    sample_dir = copy_run(png_run, tmp_path)
    (run_dir_of(sample_dir) / "000005.png").unlink()  # its feature block also holds image 4 (3 per batch, 2 ranks)
    result = sampler.run(1, sampler.pixel_args(sample_dir, N, 3, *eval_args(files), steps=STEPS))
    assert result.returncode == 0, result.stderr
    assert f"{N - 1} of {N} images present, 1 to sample" in result.stdout
    stored, extract, sample = features_line(result.stdout)
    assert sample == 1 and extract >= 1 and stored + extract + sample == N
    assert_same_metrics(metrics_of(sample_dir), metrics_of(png_run))


@pytest.mark.parametrize("extra, message", [
    (["--ref", "{tmp}/missing.npz"], "--ref {tmp}/missing.npz"),
    (["--ref", "{ref}", "--metrics", "fid,bogus"], "bogus"),
    (["--ref", "{ref}", "--bootstrap", "1"], "--bootstrap 1"),
    (["--bootstrap", "4"], "--ref"),
    (["--save", "none"], "--ref"),
    (["--ref", "{ref}", "--inception-weights", "{tmp}/none.pth"], "--inception-weights"),
    (["--ref", "{ref}", "--num-fid-samples", "3"], "precision/recall"),
    (["--ref", "{ref}", "--shard-size", "0"], "--shard-size"),
    (["--ref", "{bad}"], "--ref"),
])
def test_bad_metric_input_is_one_line_before_any_work(extra, message, sampler, files, tmp_path):
    bad = tmp_path / "nchw.npz"
    np.savez(bad, arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    fill = {"tmp": tmp_path, "ref": files["ref"], "bad": bad}
    argv = [*sampler.pixel_args(tmp_path / "samples", N, 4), *[a.format(**fill) for a in extra]]
    with pytest.raises(UserError) as info:
        config_from_args(sample_ddp.build_parser().parse_args(argv))
    text = str(info.value)
    assert "\n" not in text and message.format(**fill) in text
    assert not (tmp_path / "samples").exists()


def test_bootstrap_adds_the_spread(sampler, files, npz_run, tmp_path):
    sample_dir = copy_run(npz_run, tmp_path)
    result = sampler.run(1, sampler.pixel_args(sample_dir, N, 4, "--save", "npz", "--bootstrap", "3",
                                               *eval_args(files, metrics="is"), steps=STEPS))
    assert result.returncode == 0, result.stderr
    report = metrics_of(sample_dir)
    assert report["bootstrap"] == {"resamples": 3, "seed": 0}
    assert report["inception_score"] == pytest.approx(metrics_of(npz_run)["inception_score"], rel=1e-12)
    assert report["inception_score_std"] > 0 and "fid" not in report
    assert "Inception Score bootstrap std:" in result.stdout
