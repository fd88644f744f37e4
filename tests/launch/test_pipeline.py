"""`python -m launch.pipeline`: bad input fails in one line before any sampling (the pipeline job itself runs on
the real SLURM cluster: test_slurm_jobs.py)."""

from __future__ import annotations

import pytest
from conftest import sampler_args

from launch import pipeline
from launch.runtime.errors import EXIT_BAD_INPUT


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
