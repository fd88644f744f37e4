"""`python -m launch.pipeline`: sample -> pack -> evaluate -> <run>.metrics.json, under sample.sbatch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import EVAL_IMAGES, sampler_args
from PIL import Image

from launch import pipeline
from launch.runtime.errors import EXIT_BAD_INPUT

ADM_LINES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
             "recall": "Recall"}


def test_pipeline_job_writes_the_npz_and_its_metrics_next_to_it(pipeline_job, ref_npz):
    run, npz = pipeline_job.run_dir, pipeline_job.npz
    metrics_file = Path(f"{run}.metrics.json")
    assert metrics_file.parent == npz.parent
    pngs = sorted(run.glob("[0-9]*.png"))
    with np.load(npz) as z:
        images = z["arr_0"]
    np.testing.assert_array_equal(images, np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs]))
    assert len(pngs) == EVAL_IMAGES
    report = json.loads(metrics_file.read_text())
    assert report["reference_batch"] == str(ref_npz.resolve())
    assert report["sample_batch"] == str(npz.resolve())
    assert report["num_samples"] == report["num_reference"] == EVAL_IMAGES
    assert "2 process(es)" in pipeline_job.log  # sampled by both ranks
    for key, name in ADM_LINES.items():  # rank 0 printed ADM's lines, and they are the file's numbers
        m = re.search(rf"^{name}: (\S+)$", pipeline_job.log, flags=re.M)
        assert m, name
        assert float(m.group(1)) == pytest.approx(report[key], rel=1e-12)
    assert np.isfinite(report["fid"]) and report["fid"] > 0
    assert not list(npz.parent.glob(".*.tmp-*"))
    # One Inception pass, in the sampling job: features stored beside the images, the .npz never read back.
    (features,) = run.glob("features-*")
    assert sum(int(p.name.rsplit("-", 1)[1][: -len(".npz")]) for p in features.glob("*.npz")) == EVAL_IMAGES
    assert f"samples {npz}" not in pipeline_job.log
    assert report["world_size"] == 2  # reduced over both ranks, as the sharded evaluator does


@pytest.mark.parametrize("extra, message", [
    (["--ref", "{tmp}/missing.npz"], "missing.npz"),
    (["--ref", "{ref}", "--no-npz"], "--no-npz"),
    (["--ref", "{ref}", "--metrics", "fid,bogus"], "bogus"),
    (["--ref", "{ref}", "--num-fid-samples", "0"], "--num-fid-samples"),
])
def test_bad_input_fails_in_one_line_before_any_sampling(extra, message, tiny_ckpt, ref_npz, tmp_path,
                                                         capsys):
    sample_dir = tmp_path / "samples"
    argv = [a.format(tmp=tmp_path, ref=ref_npz) for a in extra]
    code = pipeline.main([*sampler_args(tiny_ckpt, sample_dir, n=4), *argv])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not sample_dir.exists()
