"""`python -m launch.sweep`: a grid of sampling runs with one model and one Inception load per process,
sweep.json/.csv/.png, resumable point by point. In this process with the stand-in network (fast, loads counted);
sweep.sbatch with torchrun and the real Inception architecture runs on the real SLURM cluster (test_slurm_jobs.py)."""

from __future__ import annotations

import csv
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BATCH, sampler_args
from fake_inception import StandInExtractor
from PIL import Image

from evaluation import run_metrics
from evaluation.inception import InceptionWeights
from evaluation.report import evaluate
from launch import sweep
from launch.runtime import preempt
from launch.runtime.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED

N = 8
STEPS = 5
GRID = ["--cfg-scales", "1,2", "--guidance-intervals", "none,0:500"]  # 4 points


@pytest.fixture
def in_process(monkeypatch, inception_weights):
    """launch.sweep.main in this process with the stand-in network; counts the model and Inception loads."""
    counts = {"network": 0, "inception": 0}
    real_load = sweep.load_network

    def load_network(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        counts["network"] += 1
        return real_load(*args, **kwargs)

    def extractor(weights, device, batch_size):  # noqa: ANN001, ANN202
        counts["inception"] += 1
        return StandInExtractor(weights, str(device), batch_size)

    monkeypatch.setattr(sweep, "load_network", load_network)
    monkeypatch.setattr(run_metrics, "InceptionExtractor", extractor)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the sampler installs its fail-fast hook
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIT_CPU_THREADS", "1")  # as the subprocess tests: threads spin badly on a loaded CPU
    saved = {sig: signal.getsignal(sig) for sig in preempt.STOP_SIGNALS}
    yield counts
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preempt._stop.clear()


def sweep_args(tiny_ckpt: Path, ref_npz: Path, weights: Path, sample_dir: Path, *extra: str) -> list[str]:
    return [*sampler_args(tiny_ckpt, sample_dir, n=N, steps=STEPS), "--ref", str(ref_npz),
            "--inception-weights", str(weights), "--no-eval-cache", "--shard-size", str(BATCH), *extra]


def rows_of(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / "sweep.json").read_text())["points"]


@pytest.fixture
def finished(in_process, tiny_ckpt, ref_npz, inception_weights, tmp_path) -> Path:
    out = tmp_path / "sweep"
    code = sweep.main(sweep_args(tiny_ckpt, ref_npz, inception_weights, out, *GRID, "--save", "npz"))
    assert code == EXIT_OK
    assert in_process == {"network": 1, "inception": 1}  # one load per process for the 4 points
    return out


def test_sweep_writes_one_run_per_point_and_the_table_and_plot(finished, ref_npz, inception_weights):
    rows = rows_of(finished)
    assert [(r["cfg_scale"], r["guidance_interval"]) for r in rows] == [
        (1.0, None), (2.0, None), (1.0, [0.0, 500.0]), (2.0, [0.0, 500.0])]
    assert len({r["run_dir"] for r in rows}) == 4 and all("-gi-0-500" in r["run_dir"] for r in rows[2:])
    network = StandInExtractor(InceptionWeights(inception_weights, "explicit", True))
    for row in rows:  # each point's numbers are the evaluator's on that point's images
        report = json.loads(Path(row["metrics_json"]).read_text())
        expected = evaluate(ref_npz, Path(f"{row['run_dir']}.npz"), network, cache_dir=None)
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            assert row[key] == report[key] == pytest.approx(expected[key], rel=1e-7), key
    assert rows[0]["fid"] == pytest.approx(rows[2]["fid"], rel=1e-12)  # scale 1: no guidance, interval or not
    assert rows[1]["fid"] != pytest.approx(rows[0]["fid"], rel=1e-6)
    with open(finished / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["fid"]) for r in table] == [r["fid"] for r in rows]
    with Image.open(finished / "sweep.png") as im:
        assert im.size == tuple(int(x * sweep.PLOT_DPI) for x in sweep.FIGURE_SIZE)
        assert np.asarray(im.convert("L")).std() > 0


def test_a_stopped_sweep_resumes_point_by_point(in_process, finished, tiny_ckpt, ref_npz, inception_weights,
                                                tmp_path, monkeypatch, capsys):
    out = tmp_path / "stopped"
    calls = {"n": 0}

    def requested() -> bool:  # the stop signal arrives during the second batch of point 2 (of 4)
        calls["n"] += 1
        return calls["n"] == N // BATCH + 2

    monkeypatch.setattr(preempt, "requested", requested)
    args = sweep_args(tiny_ckpt, ref_npz, inception_weights, out, *GRID, "--save", "npz")
    assert sweep.main(args) == EXIT_PREEMPTED
    assert not (out / "sweep.json").exists()
    capsys.readouterr()
    monkeypatch.setattr(preempt, "requested", lambda: False)
    assert sweep.main(args) == EXIT_OK
    log = capsys.readouterr().out
    assert f"{N} of {N} images present, 0 to sample" in log  # the first point is only re-scored
    got, expected = rows_of(out), rows_of(finished)
    for a, b in zip(got, expected):
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert len(got) == len(expected)


@pytest.mark.parametrize("extra, message", [
    (["--cfg-scales", "1,x"], "--cfg-scales"),
    (["--cfg-scales", "0.5,1"], "--cfg-scale"),
    (["--cfg-scales", "1", "--guidance-intervals", "600:100"], "--guidance-interval"),
    (["--cfg-scales", "1", "--steps", "0"], "--num-sampling-steps"),
])
def test_bad_grids_fail_in_one_line_before_any_work(extra, message, in_process, tiny_ckpt, ref_npz,
                                                      inception_weights, tmp_path, capsys):
    code = sweep.main(sweep_args(tiny_ckpt, ref_npz, inception_weights, tmp_path / "s", *extra))
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and err.startswith("error: ") and "\n" not in err and message in err
    assert in_process == {"network": 0, "inception": 0} and not (tmp_path / "s").exists()


def test_compare_names_the_sampling_setting_two_points_differ_in(finished):
    """Two points of a sweep carry the same yardstick in their protocol and differ in one sampling setting:
    evaluation.compare says they are comparable and names that setting (the guidance scale) as the difference."""
    from evaluation.compare import compare, read_metrics_file

    rows = rows_of(finished)
    a, b = (read_metrics_file(rows[k]["metrics_json"]) for k in (0, 1))
    sampling = a.report["protocol"]["sampling"]
    assert sampling["sampler"] == "ddpm" and sampling["num_steps"] == STEPS and sampling["family"] == "dit"
    assert sampling["seed_rule"].startswith("seed_i = global_seed * 2**21 + i") and sampling["world_size"] == 1
    assert len(sampling["checkpoint_sha256"]) == 64
    result = compare([a, b])
    assert [d["field"] for d in result["differences"]] == ["sampling.guidance_scale"]
    assert result["differences"][0]["values"] == [1.0, 2.0]
    assert {v["verdict"] for v in result["verdicts"]} <= {"comparable", "within noise"}
    assert compare([a, a])["protocols_same"]
