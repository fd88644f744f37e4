"""A launch environment that cannot work, through the real commands: WORLD_SIZE without RANK, DIT_CPU_THREADS that
is not a positive integer. Each command (sample_ddp.py, the evaluator, train.py) ends with one line and exit 2,
no traceback, and under `python -m launch.torchrun` every rank does. The values themselves are checked in
tests/launch/test_dist_single.py; this is the path a user takes. Under torchrun a rank other than 0 waits for
rank 0's line (it may still be starting when the others fail) instead of leaving at once, which let torchrun stop
rank 0 before it printed anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "DIT_CPU_THREADS", "MASTER_ADDR",
               "MASTER_PORT")
TIMEOUT_S = 180


def sampler_args(ckpt: Path, sample_dir: Path) -> list[str]:
    """A tiny run of the launch tests' pixel checkpoint (conftest's tiny_ckpt)."""
    return ["--model", "custom", "--ckpt", str(ckpt), "--image-size", "8", "--vae", "none", "--num-classes", "10",
            "--num-fid-samples", "4", "--per-proc-batch-size", "2", "--num-sampling-steps", "2",
            "--sample-dir", str(sample_dir)]


def env_with(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **values)
    return env


def assert_one_line_exit_2(proc: subprocess.Popen, message: str) -> None:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: environment variable {message}"] or errors == [f"error: {message}"], err[-3000:]


def test_each_command_refuses_a_bad_launch_environment_in_one_line(tiny_ckpt, ref_npz, tmp_path):
    train = ["train.py", "--dataset", "folder", "--data-path", str(tmp_path / "data"), "--image-size", "8",
             "--vae", "none", "--model", "custom", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
             "--patch-size", "2", "--results-dir", str(tmp_path / "train")]
    cases = [
        (["sample_ddp.py", *sampler_args(tiny_ckpt, tmp_path / "samples")], {"WORLD_SIZE": "2"},
         "RANK and WORLD_SIZE must be set together (torchrun sets both); unset them to run as one process"),
        (["-m", "evaluation.evaluator", str(ref_npz), str(ref_npz), "--no-cache", "--no-download"],
         {"DIT_CPU_THREADS": "0"}, "DIT_CPU_THREADS='0': expected an integer >= 1"),
        (train, {"DIT_CPU_THREADS": "abc"}, "DIT_CPU_THREADS='abc': expected an integer >= 1"),
        # reporting it read RANK again and failed on it: a traceback
        (["-m", "evaluation.evaluator", str(ref_npz), str(ref_npz), "--no-cache", "--no-download"],
         {"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x': expected an integer >= 0"),
    ]
    procs = [(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env_with(**env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True), message) for argv, env, message in cases]
    for proc, message in procs:  # started together: interpreters starting on a loaded machine
        assert_one_line_exit_2(proc, message)
    assert not any(Path(tmp_path).iterdir())  # nothing made: no sample folder, no results folder


def test_every_rank_under_launch_torchrun_exits_2_with_one_line(tiny_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc_per_node=2", "--monitor-interval=0.2",
           "sample_ddp.py", *sampler_args(tiny_ckpt, tmp_path / "samples")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_with(DIT_CPU_THREADS="abc"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert_one_line_exit_2(proc, "DIT_CPU_THREADS='abc': expected an integer >= 1")
    assert not (tmp_path / "samples").exists()


def test_a_rank_other_than_0_waits_for_rank_0s_line_and_gives_its_own_only_after(monkeypatch, capsys):
    """The race behind a job that ended without a word: rank 1 left at once, torchrun stopped rank 0 before it
    printed. Rank 1 now waits (stop signals end it at once) and prints the line itself only if nobody ends it."""
    import signal
    import time

    from launch.runtime import command, dist
    from launch.runtime.errors import UserError

    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "_info", None)
    monkeypatch.setattr(command, "RANK0_REPORT_WAIT_S", 0.3)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        start = time.monotonic()
        command.say_error(UserError("--flag 3: bad"))
        assert time.monotonic() - start >= 0.3
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL == signal.getsignal(signal.SIGINT)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert capsys.readouterr().err == "error: [rank 1] --flag 3: bad\n"
