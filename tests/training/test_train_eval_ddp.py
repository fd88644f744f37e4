"""train.py --eval-every on two processes (torchrun, gloo) with the real Inception architecture (torch-fidelity's
network with random weights, tests/fake_inception.py): the evaluation's collectives run between DDP steps, and
the sample_ddp.py command of the metrics.jsonl line, run on ONE process, prints the same numbers (the images do
not depend on the number of processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, run_script
from fake_inception import make_random_inception_state

N = 8
METRICS = "is,prec,recall"  # FID on 8 images means 2048-d eigen-solves (seconds each): the stand-in tests have it
SLOW_S = 300


def test_two_rank_training_evaluates_and_one_rank_reproduces(image_folder, tmp_path):
    weights, ref = tmp_path / "inception.pth", tmp_path / "ref.npz"
    torch.save(make_random_inception_state(0), weights)
    np.savez(ref, arr_0=np.random.default_rng(3).integers(0, 256, (N, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8))
    results = tmp_path / "run"
    args = ["--data-path", str(image_folder), "--image-size", str(TINY_SIZE), "--vae", "none", "--model", "custom",
            "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "2", "--global-batch-size", "4",
            "--max-steps", "2", "--log-every", "1", "--num-workers", "0", "--no-progress", "--ema-decay", "0.5",
            "--results-dir", str(results), "--eval-every", "2", "--eval-ref", str(ref), "--eval-samples", str(N),
            "--eval-steps", "3", "--eval-batch-size", "2", "--eval-metrics", METRICS,
            "--eval-inception-weights", str(weights), "--eval-cache-dir", str(tmp_path / "cache")]
    trained = run_script(2, "train.py", args, timeout=SLOW_S)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    (line,) = [json.loads(t) for t in (results / "metrics.jsonl").read_text().splitlines()]
    report = json.loads(Path(f"{line['run_dir']}.metrics.json").read_text())
    assert report["world_size"] == 2 and report["num_samples"] == N
    again = run_script(1, "sample_ddp.py", [*line["sample_ddp_args"], "--sample-dir", str(tmp_path / "again")],
                       timeout=SLOW_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (metrics_json,) = (tmp_path / "again").glob("*.metrics.json")
    reproduced = json.loads(metrics_json.read_text())
    assert set(line["metrics"]) == {"inception_score", "precision", "recall"}
    for key, value in line["metrics"].items():
        assert reproduced[key] == pytest.approx(value, rel=1e-5), key
    assert reproduced["world_size"] == 1
