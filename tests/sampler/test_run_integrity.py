"""The run folder trusts only what it wrote, end to end: blocks copied in from another run or damaged on disk are
set aside with a warning and redone, the `.npz` is replaced only by a checked one, `<run>.metrics.json` is the
evaluator's report of that `.npz`, and a write that fails names the block.

sample_ddp.main runs in this process (as tests/launch/test_sweep.py runs the sweep) with the stand-in feature
network of tests/fake_inception.py, so a run takes about a second; the subprocess path with the real Inception
architecture is tests/sampler/test_job_metrics.py's. 16x16 images, so that an image shard of four holds 3,072
bytes of pixels and 2,000 of them can be damaged.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import shutil
import signal
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_inception import StandInExtractor

import sample_ddp
from evaluation import run_metrics
from evaluation.inception import InceptionWeights
from evaluation.report import evaluate
from launch.runtime import blocks, dist, preempt
from launch.runtime.npzfile import member_data_offset, read_header

N = 8
SIZE = 16
BATCH = 4  # one image shard and one feature block per batch: indices 0-3 and 4-7
GOOD_CFG, OTHER_CFG = 2.0, 4.0
DAMAGED_BYTES = 2000
KEYS = ("fid", "sfid", "inception_score", "precision", "recall")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 16x16 pixel checkpoint, a reference batch and a weights file the stand-in network accepts."""
    from models.demo import save_checkpoint, untrained_dit

    base = tmp_path_factory.mktemp("integrity-inputs")
    net, config = untrained_dit("custom", input_size=SIZE, in_channels=3, num_classes=10, seed=4, depth=2,
                                hidden_size=32, num_heads=2, patch_size=4)
    ref = base / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(9).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8))
    weights = base / "stand-in-weights.pth"  # the two keys the weights check reads; the stand-in ignores them
    torch.save({"fc.weight": torch.ones(1, 1), "Mixed_6d.branch1x1.conv.weight": torch.zeros(1)}, weights)
    return {"ckpt": save_checkpoint(net, config, base / "tiny16.pt"), "ref": ref, "weights": weights}


def sampler_args(files: dict[str, Path], sample_dir: Path, cfg_scale: float = GOOD_CFG, *extra: str) -> list[str]:
    return ["--model", "custom", "--ckpt", str(files["ckpt"]), "--image-size", str(SIZE), "--vae", "none",
            "--num-classes", "10", "--cfg-scale", str(cfg_scale), "--num-fid-samples", str(N),
            "--per-proc-batch-size", str(BATCH), "--num-sampling-steps", "4", "--save", "npz",
            "--shard-size", str(BATCH), "--ref", str(files["ref"]), "--inception-weights", str(files["weights"]),
            "--no-eval-cache", "--sample-dir", str(sample_dir), *extra]


class Run:
    """One in-process run of sample_ddp.main: exit code, stdout, stderr and the warnings it gave."""

    def __init__(self, argv: list[str]):
        out, err = io.StringIO(), io.StringIO()
        hook, handlers = sys.excepthook, {sig: signal.getsignal(sig) for sig in preempt.STOP_SIGNALS}
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.code = sample_ddp.main(argv)
        finally:
            sys.excepthook = hook  # the sampler installs its fail-fast hook and stop-signal handlers
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            preempt._stop.clear()
            dist.shutdown()
        self.out, self.err = out.getvalue(), err.getvalue()
        self.warnings = [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def stand_in():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_metrics, "InceptionExtractor", lambda w, device, batch_size: StandInExtractor(w, str(device),
                                                                                                   batch_size))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("DIT_CPU_THREADS", "1")
        yield


def finished_run(files: dict[str, Path], out: Path, cfg_scale: float) -> Path:
    run = Run(sampler_args(files, out, cfg_scale))
    assert run.code == 0, run.err
    return out


@pytest.fixture(scope="module")
def good(stand_in, files, tmp_path_factory) -> Path:
    return finished_run(files, tmp_path_factory.mktemp("good"), GOOD_CFG)


@pytest.fixture(scope="module")
def other(stand_in, files, tmp_path_factory) -> Path:
    """The same command at another guidance scale: blocks of the same names, other images and features."""
    return finished_run(files, tmp_path_factory.mktemp("other"), OTHER_CFG)


@pytest.fixture(scope="module")
def expected(good, files) -> dict:
    """The evaluator's numbers on the good run's `.npz`."""
    network = StandInExtractor(InceptionWeights(files["weights"], "explicit", True))
    return evaluate(files["ref"], npz_of(good), network, cache_dir=None)


def run_dir_of(sample_dir: Path) -> Path:
    (run,) = [p for p in sample_dir.iterdir() if p.is_dir()]
    return run


def npz_of(sample_dir: Path) -> Path:
    return Path(f"{run_dir_of(sample_dir)}.npz")


def metrics_of(sample_dir: Path) -> dict:
    return json.loads(Path(f"{run_dir_of(sample_dir)}.metrics.json").read_text())


def copy_without_results(source: Path, tmp_path: Path) -> Path:
    """A copy of a finished run with its `.npz` and metrics removed: whatever the rerun leaves is its own."""
    out = Path(shutil.copytree(source, tmp_path / "copy"))
    npz_of(out).unlink()
    Path(f"{run_dir_of(out)}.metrics.json").unlink()
    return out


def features_dir(sample_dir: Path) -> Path:
    (folder,) = run_dir_of(sample_dir).glob("features-*")
    return folder


def first_block(folder: Path) -> Path:
    return sorted(folder.glob("[0-9]*.npz"))[0]


def flip_array_bytes(block: Path, name: str, count: int) -> None:
    """Invert `count` bytes in the middle of array `name`'s data (headers and the zip directory intact)."""
    with zipfile.ZipFile(block) as z:
        info = z.getinfo(f"{name}.npy")
        with z.open(info) as f:
            (shape, dtype, _), header = read_header(f)
    start = member_data_offset(block, info) + header
    size = int(np.prod(shape)) * dtype.itemsize
    assert size >= count, (size, count)
    offset = start + (size - count) // 2
    with open(block, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def error_line(err: str) -> str:
    """The one `error:` line, last on stderr (progress lines may stand before it), and no traceback."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    return errors[0]


def damage_found(warning: str, name: str) -> bool:
    """The warning gives the checksum that failed: the zip member's CRC-32 (checked when a read reaches the
    member's end: at once for a small block) or the block's own CRC-32 of the array."""
    return f"Bad CRC-32 for file '{name}.npy'" in warning or f"array {name} does not match its checksum" in warning


def assert_results_are_the_good_runs(sample_dir: Path, good: Path, expected: dict) -> None:
    """The `.npz` is the good run's byte for byte, and metrics.json is the evaluator's report of it."""
    assert npz_of(sample_dir).read_bytes() == npz_of(good).read_bytes()
    report = metrics_of(sample_dir)
    assert report["sample_batch"] == str(npz_of(sample_dir).resolve())
    for key in KEYS:
        assert report[key] == pytest.approx(expected[key], rel=1e-7), key


def test_the_good_runs_metrics_are_the_evaluators_and_the_other_run_differs(good, other, expected):
    assert_results_are_the_good_runs(good, good, expected)
    assert npz_of(other).read_bytes() != npz_of(good).read_bytes()
    assert sorted(p.name for p in (run_dir_of(good) / "images").iterdir()) == \
        sorted(p.name for p in (run_dir_of(other) / "images").iterdir())  # same names, other contents


def test_an_image_shard_of_another_guidance_scale_is_set_aside_and_redone(good, other, expected, files, tmp_path):
    sample_dir = copy_without_results(good, tmp_path)
    shard = first_block(run_dir_of(sample_dir) / "images")
    shutil.copyfile(first_block(run_dir_of(other) / "images"), shard)
    run = Run(sampler_args(files, sample_dir))
    assert run.code == 0, run.err
    (warning,) = [w for w in run.warnings if str(shard) in w]
    assert warning.startswith(f"image shard {shard}: written by another run") and "made again" in warning
    assert (run_dir_of(sample_dir) / "set-aside" / f"images-{shard.name}").exists()
    assert f"{N - BATCH} of {N} images present, {BATCH} to sample" in run.out
    assert_results_are_the_good_runs(sample_dir, good, expected)


def test_a_feature_block_of_another_run_is_set_aside_and_computed_again(good, other, expected, files, tmp_path):
    sample_dir = copy_without_results(good, tmp_path)
    block = first_block(features_dir(sample_dir))
    shutil.copyfile(first_block(features_dir(other)), block)
    run = Run(sampler_args(files, sample_dir))
    assert run.code == 0, run.err
    (warning,) = [w for w in run.warnings if str(block) in w]
    assert warning.startswith(f"feature block {block}: written by another run") and "computed again" in warning
    assert f"{N} of {N} images present, 0 to sample" in run.out
    assert f"{N - BATCH} of {N} stored, {BATCH} to extract from stored images, 0 with" in run.out
    assert_results_are_the_good_runs(sample_dir, good, expected)


def test_2000_damaged_bytes_in_an_image_shard_are_found_and_the_npz_replaced_by_a_checked_one(
        good, expected, files, tmp_path):
    """Damage between two runs of the same command: the rerun sets the shard aside, makes its images again and
    replaces the good `.npz` by a new, checked one that metrics.json describes."""
    sample_dir = Path(shutil.copytree(good, tmp_path / "copy"))
    shard = first_block(run_dir_of(sample_dir) / "images")
    flip_array_bytes(shard, "arr_0", DAMAGED_BYTES)
    old = npz_of(sample_dir).stat()
    run = Run(sampler_args(files, sample_dir))
    assert run.code == 0, run.err
    (warning,) = [w for w in run.warnings if str(shard) in w]
    assert damage_found(warning, "arr_0"), warning
    assert f"{N - BATCH} of {N} images present, {BATCH} to sample" in run.out
    assert npz_of(sample_dir).stat().st_ino != old.st_ino  # a new file, renamed over the old one
    assert_results_are_the_good_runs(sample_dir, good, expected)


def test_pack_only_never_replaces_the_npz_by_one_from_a_damaged_shard(good, files, tmp_path):
    sample_dir = Path(shutil.copytree(good, tmp_path / "copy"))
    shard = first_block(run_dir_of(sample_dir) / "images")
    flip_array_bytes(shard, "arr_0", DAMAGED_BYTES)
    before = npz_of(sample_dir).read_bytes()
    run = Run([*sampler_args(files, sample_dir), "--pack-only"])
    assert run.code == 2
    assert "rerun the sampl" in error_line(run.err)
    # found by the scan (a small shard: the zip's CRC-32 on the first read) or by the assembly (the array's)
    assert any(str(shard) in w and damage_found(w, "arr_0") for w in run.warnings), run.warnings
    assert npz_of(sample_dir).read_bytes() == before
    assert not list(sample_dir.glob(".*tmp*")) and not list(sample_dir.glob(".*.lock"))


def test_a_feature_block_with_a_bad_checksum_is_set_aside_and_redone_once(good, expected, files, tmp_path):
    """It used to say `rerun the same command to redo it` on every rerun."""
    sample_dir = copy_without_results(good, tmp_path)
    block = first_block(features_dir(sample_dir))
    flip_array_bytes(block, "pool", 16)
    run = Run(sampler_args(files, sample_dir))
    assert run.code == 0, run.err
    (warning,) = [w for w in run.warnings if str(block) in w]
    assert damage_found(warning, "pool"), warning
    assert f"{N - BATCH} of {N} stored, {BATCH} to extract from stored images, 0 with" in run.out
    assert_results_are_the_good_runs(sample_dir, good, expected)
    again = Run(sampler_args(files, sample_dir))
    assert again.code == 0 and f"{N} of {N} stored, 0 to extract" in again.out
    assert not [w for w in again.warnings if "block" in w or "shard" in w]


@pytest.mark.parametrize("kind, folder", [("feature block", "features-"), ("image shard", "images")])
def test_a_full_disk_names_the_block_that_failed(kind, folder, stand_in, files, tmp_path, monkeypatch):
    """ENOSPC while a block is written (and on every write after it: the disk stays full): one line naming the
    block that failed first, not one written after it, nothing half written, exit 2."""
    real_savez, full = blocks.np.savez, []

    def savez(f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if full or Path(f.name).parent.name.startswith(folder):
            full.append(f.name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(f, *args, **kwargs)

    monkeypatch.setattr(blocks.np, "savez", savez)
    run = Run(sampler_args(files, tmp_path))
    assert run.code == 2
    line = error_line(run.err)
    assert line.startswith(f"error: cannot write {kind} {run_dir_of(tmp_path)}/") and line.endswith(
        ": No space left on device"), line
    assert not list(run_dir_of(tmp_path).rglob(".*tmp*"))


def test_no_temporary_of_a_killed_writer_survives_a_rerun(good, files, tmp_path):
    """Block temporaries in images/ and features-*/, and those beside and in the folder, are removed when the
    rerun opens the folder; the finished results are kept."""
    sample_dir = Path(shutil.copytree(good, tmp_path / "copy"))
    run = run_dir_of(sample_dir)
    dead = "999999999-1"
    left = [run / "images" / f".000000-000003-4.npz.tmp-{dead}",
            features_dir(sample_dir) / f".000004-000007-4.npz.tmp-{dead}", run / f".manifest.json.tmp-{dead}",
            sample_dir / f".{run.name}.npz.tmp-{dead}", sample_dir / f".{run.name}.metrics.json.tmp-{dead}"]
    for path in left:
        path.write_bytes(b"\0" * 1024)
    again = Run(sampler_args(files, sample_dir))
    assert again.code == 0, again.err
    assert not [p for p in left if p.exists()] and not list(sample_dir.rglob(".*tmp*"))
    assert f"{N} of {N} images present, 0 to sample" in again.out
    assert npz_of(sample_dir).read_bytes() == npz_of(good).read_bytes()
