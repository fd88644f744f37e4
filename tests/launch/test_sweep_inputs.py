"""`python -m launch.sweep` refuses a grid with one bad point, or a sweep folder it cannot write, before any point
is sampled: one line naming the sweep's own flag (--cfg-scales, --steps, --sweep-dir, not the sampler's), exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import sweep
from launch.runtime.errors import EXIT_BAD_INPUT


def sampler_args(ckpt: Path, sample_dir: Path) -> list[str]:
    """A tiny sweep of the launch tests' pixel checkpoint (conftest's tiny_ckpt)."""
    return ["--model", "custom", "--ckpt", str(ckpt), "--image-size", "8", "--vae", "none", "--num-classes", "10",
            "--num-fid-samples", "8", "--per-proc-batch-size", "2", "--num-sampling-steps", "5",
            "--sample-dir", str(sample_dir)]


@pytest.mark.parametrize("extra, message", [
    (["--cfg-scales", "2", "--steps", "5,1001"],
     "error: --steps 1001: sampling steps must be at most the 1000 training steps, got 1001"),
    (["--cfg-scales", "2", "--steps", "1", "--sampler", "euler"], "error: --steps 1: euler needs at least 2 steps"),
    (["--cfg-scales", "1,nan"], "error: --cfg-scales must be a finite number, got nan"),
    (["--cfg-scales", "2", "--sweep-dir", "{blocker}/sweep"], "error: --sweep-dir {blocker}/sweep: cannot create it"),
])
def test_a_bad_point_or_sweep_folder_is_one_line_before_any_point(extra, message, tiny_ckpt, ref_npz, tmp_path,
                                                                  monkeypatch, capsys):
    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the grid was checked")

    monkeypatch.setattr(sweep, "load_network", no_network)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    argv = [*sampler_args(tiny_ckpt, tmp_path / "s"), "--ref", str(ref_npz), "--no-plot",
            *[a.format(blocker=blocker) for a in extra]]
    code = sweep.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and "\n" not in err, err
    assert err.startswith(message.format(blocker=blocker)), err
    assert not (tmp_path / "s").exists() and not list(Path(tmp_path).glob("**/sweep.json"))
