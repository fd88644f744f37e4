"""sample_ddp.py end to end under torchrun (gloo, CPU) with tiny models made by the fixtures."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

N = 16
STEPS = 100  # long enough to kill a run in the middle


def run_dir_of(sample_dir: Path) -> Path:
    dirs = [p for p in sample_dir.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def npz_of(sample_dir: Path) -> Path:
    return Path(f"{run_dir_of(sample_dir)}.npz")


@pytest.fixture(scope="module")
def reference_run(sampler, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run every other run is compared with."""
    out = tmp_path_factory.mktemp("two-proc")
    result = sampler.run(2, sampler.pixel_args(out, N, 3, "--label-sampling", "balanced", steps=STEPS))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_two_processes_write_exactly_n_pngs_and_a_matching_npz(reference_run, sampler):
    run_dir = run_dir_of(reference_run)
    assert run_dir.name == "custom-tiny-pixel-size-8-vae-none-cfg-2.0-seed-0-ddpm-100"
    pngs = sorted(p.name for p in run_dir.glob("[0-9]*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(N)]
    assert not list(run_dir.glob(".*tmp*"))
    data = np.load(npz_of(reference_run))
    images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (N, 8, 8, 3) and images.dtype == np.uint8
    for i in range(N):
        assert np.array_equal(images[i], np.asarray(Image.open(run_dir / f"{i:06d}.png")))
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < sampler.num_classes
    # balanced: 16 images over 10 classes -> every class 1 or 2 times
    counts = np.bincount(labels, minlength=sampler.num_classes)
    assert counts.min() == 1 and counts.max() == 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["labels"] == labels.tolist()
    assert manifest["sessions"][0]["world_size"] == 2
    assert manifest["seed_formula"].startswith("seed_i = global_seed * 2**21 + i")
    assert (run_dir / "grid.png").exists()
    assert images.std() > 0  # not a constant image


def test_one_process_other_batch_size_gives_identical_images(reference_run, sampler, tmp_path):
    result = sampler.run(1, sampler.pixel_args(tmp_path, N, 4, "--label-sampling", "balanced", steps=STEPS))
    assert result.returncode == 0, result.stderr
    a = np.load(npz_of(reference_run))
    b = np.load(npz_of(tmp_path))
    assert np.array_equal(a["arr_1"], b["arr_1"])
    assert np.array_equal(a["arr_0"], b["arr_0"])


def test_stochastic_solver_does_not_depend_on_processes_or_batch(sampler, tmp_path):
    """dpm++2m-sde draws a fresh normal at every step from each sample's own stream: 2 processes with batches
    of 3 and 1 process with a batch of 5 give the same images; the manifest records its NFE and the name has it."""
    runs = []
    for procs, batch in ((2, 3), (1, 5)):
        out = tmp_path / f"p{procs}"
        result = sampler.run(procs, sampler.pixel_args(out, 7, batch, "--sampler", "dpm++2m-sde", steps=6))
        assert result.returncode == 0, result.stdout + result.stderr
        runs.append(np.load(npz_of(out)))
    assert np.array_equal(runs[0]["arr_0"], runs[1]["arr_0"]) and np.array_equal(runs[0]["arr_1"], runs[1]["arr_1"])
    run_dir = run_dir_of(tmp_path / "p1")
    assert run_dir.name.endswith("-dpm++2m-sde-6")
    assert json.loads((run_dir / "manifest.json").read_text())["sampler"]["nfe"] == 6


def test_sigkill_of_one_rank_ends_the_job_fast_and_resume_is_bitwise_identical(reference_run, sampler, tmp_path):
    args = sampler.pixel_args(tmp_path, N, 3, "--label-sampling", "balanced", steps=STEPS)
    proc = sampler.start(2, args)
    try:
        sampler.wait_for_files(tmp_path, "*/[0-9]*.png", 2)
        workers = sampler.worker_pids(proc.pid)
        assert len(workers) == 2
        killed_at = time.time()
        os.kill(workers[1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert elapsed < 30, elapsed
    assert "SIGKILL" in output and "rank" in output, output[-2000:]
    done = len(list(run_dir_of(tmp_path).glob("[0-9]*.png")))
    assert done < N, "the run finished before it was killed; make it longer"

    resumed = sampler.run(2, args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{done} of {N} images present" in resumed.stdout
    with open(npz_of(reference_run), "rb") as f1, open(npz_of(tmp_path), "rb") as f2:
        assert f1.read() == f2.read()
    manifest = json.loads((run_dir_of(tmp_path) / "manifest.json").read_text())
    assert [s["world_size"] for s in manifest["sessions"]] == [2, 2]


def test_truncated_png_is_regenerated_and_other_config_is_refused(reference_run, sampler, tmp_path):
    import shutil

    sample_dir = tmp_path / "copy"
    shutil.copytree(reference_run, sample_dir)
    run_dir = run_dir_of(sample_dir)
    npz = npz_of(sample_dir)
    npz.unlink()
    victim = run_dir / "000005.png"
    victim.write_bytes(victim.read_bytes()[:40])
    args = sampler.pixel_args(sample_dir, N, 5, "--label-sampling", "balanced", steps=STEPS)
    result = sampler.run(1, args)
    assert result.returncode == 0, result.stderr
    assert f"{N - 1} of {N} images present" in result.stdout
    with open(npz_of(reference_run), "rb") as f1, open(npz, "rb") as f2:
        assert f1.read() == f2.read()

    other = sampler.run(1, [*args, "--guidance-channels", "all"])
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "guidance_channels" in lines[0] and "--overwrite" in lines[0], other.stderr


def test_pack_only_rebuilds_the_npz(reference_run, sampler, tmp_path):
    import shutil

    sample_dir = tmp_path / "copy"
    shutil.copytree(reference_run, sample_dir)
    npz_of(sample_dir).unlink()
    result = sampler.run(1, [*sampler.pixel_args(sample_dir, N, 3, "--label-sampling", "balanced", steps=STEPS),
                             "--pack-only"])
    assert result.returncode == 0, result.stderr
    with open(npz_of(reference_run), "rb") as f1, open(npz_of(sample_dir), "rb") as f2:
        assert f1.read() == f2.read()


def test_latent_model_with_local_vae_under_two_processes(tiny_latent_ckpt, tiny_vae_dir, sampler, tmp_path):
    args = ["--model", "custom", "--ckpt", str(tiny_latent_ckpt), "--vae", "ema", "--vae-path", str(tiny_vae_dir),
            "--image-size", "32", "--num-classes", str(sampler.num_classes), "--cfg-scale", "4.0",
            "--guidance-channels", "all", "--sampler", "ddim", "--num-sampling-steps", "5",
            "--num-fid-samples", "5", "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path)]
    result = sampler.run(2, args)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(tmp_path)
    assert run_dir.name.endswith("-vae-ema-cfg-4.0-seed-0-ddim-5")
    images = np.load(npz_of(tmp_path))["arr_0"]
    assert images.shape == (5, 32, 32, 3)
    assert len(list(run_dir.glob("[0-9]*.png"))) == 5


def test_each_global_seed_writes_its_own_images_and_seed_0_those_of_the_rule_i(sampler, tmp_path):
    """The defect: seed_i = global_seed * 2**32 + i lost its seed term in torch's 32-bit seeding, so every
    --global-seed wrote the images of seed 0."""
    images = {}
    for seed in (0, 1):
        out = tmp_path / f"seed-{seed}"
        result = sampler.run(1, sampler.pixel_args(out, 4, 4, "--global-seed", str(seed), steps=5))
        assert result.returncode == 0, result.stdout + result.stderr
        images[seed] = np.load(npz_of(out))
    assert not np.array_equal(images[0]["arr_0"], images[1]["arr_0"])
    assert not np.array_equal(images[0]["arr_1"], images[1]["arr_1"])  # random labels: draw 1 of each stream
    refused = sampler.run(1, sampler.pixel_args(tmp_path / "big", 4, 4, "--global-seed", "2048", steps=5))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--global-seed" in refused.stderr
