"""The evaluator's flags and inputs out of range are one line before any work; a long bootstrap shows progress;
PNG folders pack the same in this process and in worker processes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from captured import run_captured
from PIL import Image

from evaluation import batches
from evaluation.evaluator import main
from evaluation.report import evaluate
from launch.runtime.rundir import index_filename

FAIL_FAST_S = 10  # no network is loaded: seconds even on a loaded machine
RESAMPLES = 20


def run_main(argv: list[str]) -> tuple[int, str, str]:
    return run_captured(main, argv)


@pytest.mark.parametrize("extra, line", [
    (["--bootstrap-seed", "-1"], "error: --bootstrap-seed -1: give a non-negative integer below 2**63"),
    (["--bootstrap", "100000000"],
     "error: --bootstrap 100000000: give 0 (none) to 1000 resamples (10 already give the spread to about 25%)"),
    (["--bootstrap", "-3"], "error: --bootstrap -3: give 0 (none) to 1000 resamples"),
])
def test_bootstrap_flags_out_of_range_are_one_line_before_any_work(extra, line, batch_files):
    start = time.perf_counter()
    code, out, err = run_main([*map(str, batch_files), "--no-cache", "--no-download", *extra])
    assert code == 2 and out == ""
    assert err.strip().startswith(line) and "\n" not in err.strip(), err
    assert time.perf_counter() - start < FAIL_FAST_S


def test_images_of_no_pixels_are_one_line(batch_files, tmp_path):
    empty = tmp_path / "empty-images.npz"
    np.savez(empty, arr_0=np.zeros((20, 0, 0, 3), np.uint8))
    code, out, err = run_main([str(batch_files[0]), str(empty), "--no-cache", "--no-download"])
    assert code == 2 and out == ""
    assert err.strip() == f"error: {empty}: arr_0 has shape (20, 0, 0, 3): images of 0x0 pixels hold nothing"


def test_a_long_bootstrap_prints_progress_every_tenth(batch_files, stand_in, capsys):
    report = evaluate(*batch_files, stand_in, ["is", "fid"], cache_dir=None, bootstrap=RESAMPLES)
    assert report["fid_std"] > 0 and report["inception_score_std"] > 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bootstrap: ")]
    done = [int(line.split()[1]) for line in lines]
    assert done == list(range(RESAMPLES // 10, RESAMPLES + 1, RESAMPLES // 10)), lines
    assert all(f"of {RESAMPLES} resamples in " in line and line.endswith(" s left)") for line in lines)
    assert lines[-1].endswith("(about 0 s left)")


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / index_filename(i, len(images)))
    return folder


@pytest.mark.parametrize("pool", [False, True])
def test_png_folders_pack_the_same_in_this_process_and_in_workers(pool, tmp_path, monkeypatch):
    """Below batches.POOL_MIN_IMAGES the PNGs decode here (a spawned worker takes seconds to start); above, in
    worker processes: the same .npz either way."""
    images = np.random.default_rng(3).integers(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    folder = write_pngs(tmp_path / "pngs", images)
    if pool:
        monkeypatch.setattr(batches, "POOL_MIN_IMAGES", 1)
    out = batches.pack_folder(folder, tmp_path / "packed.npz", 7, labels=np.arange(7), workers=2)
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], images) and np.array_equal(z["arr_1"], np.arange(7))
