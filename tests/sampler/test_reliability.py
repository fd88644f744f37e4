"""Faults a cluster user meets: each reproduced, each one line and a resumable folder."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample_ddp
from launch.runtime import dist
from launch.runtime.errors import UserError
from sampling.config import ConfigError
from sampling.options import config_from_args

N = 8
STEPS = 60
ROOT = Path(__file__).resolve().parents[2]


def sampler_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DIT_CPU_THREADS="1")
    return env


def run_dir_of(sample_dir: Path) -> Path:
    (run,) = [p for p in sample_dir.iterdir() if p.is_dir()]
    return run


def one_error_line(result) -> str:
    """Exit 2 and exactly one `error:` line, the last line on stderr (a progress bar may stand before it)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def finished(sampler, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    result = sampler.run(1, sampler.pixel_args(out, N, 4, steps=4))
    assert result.returncode == 0, result.stderr
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(finished, tmp_path / "copy"))


def test_overwrite_with_the_same_configuration_resumes(finished, sampler, tmp_path):
    sample_dir = copy_of(finished, tmp_path)
    run = run_dir_of(sample_dir)
    before = {p.name: p.stat().st_mtime_ns for p in run.glob("[0-9]*.png")}
    result = sampler.run(1, [*sampler.pixel_args(sample_dir, N, 4, steps=4), "--overwrite"])
    assert result.returncode == 0, result.stderr
    assert f"{N} of {N} images present" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("[0-9]*.png")} == before


def test_a_png_of_the_wrong_size_is_redone(finished, sampler, tmp_path):
    sample_dir = copy_of(finished, tmp_path)
    run = run_dir_of(sample_dir)
    good = np.asarray(Image.open(run / "000003.png"))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(run / "000003.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(run / "000005.png")  # right size, wrong mode
    Path(f"{run}.npz").unlink()
    result = sampler.run(1, sampler.pixel_args(sample_dir, N, 4, steps=4))
    assert result.returncode == 0, result.stderr
    assert f"{N - 2} of {N} images present" in result.stdout
    assert np.array_equal(np.asarray(Image.open(run / "000003.png")), good)
    with np.load(Path(f"{run}.npz")) as z:
        assert z["arr_0"].shape == (N, 8, 8, 3)


@pytest.mark.parametrize("blocked", ["grid.png", "npz"])
def test_a_write_error_is_one_line_naming_the_file(finished, sampler, tmp_path, blocked):
    sample_dir = copy_of(finished, tmp_path)
    run = run_dir_of(sample_dir)
    target = run / "grid.png" if blocked == "grid.png" else Path(f"{run}.npz")
    target.unlink()
    target.mkdir()  # the rename onto it fails like a full or read-only disk would
    line = one_error_line(sampler.run(1, sampler.pixel_args(sample_dir, N, 4, steps=4)))
    assert target.name in line
    assert not list(run.glob(".*tmp*")) and not list(sample_dir.glob(".*tmp*"))
    assert len(list(run.glob("[0-9]*.png"))) == N  # nothing already written is lost


def test_pack_only_with_another_count_is_refused(finished, sampler, tmp_path):
    sample_dir = copy_of(finished, tmp_path)
    args = sampler.pixel_args(sample_dir, 999, 4, steps=4)
    line = one_error_line(sampler.run(1, [*args, "--pack-only"]))
    assert "--num-fid-samples 999" in line


def test_a_huge_count_is_refused_at_once():
    start = time.time()
    args = sample_ddp.build_parser().parse_args(["--num-fid-samples", "2000000000"])
    with pytest.raises(ConfigError, match="--num-fid-samples 2000000000"):
        config_from_args(args)
    assert time.time() - start < 1


def test_two_runs_on_one_folder(sampler, tmp_path):
    args = sampler.pixel_args(tmp_path, N, 2, steps=STEPS)
    first = sampler.start(1, args)
    try:
        sampler.wait_for_files(tmp_path, "*/[0-9]*.png", 1)
        os.kill(first.pid, signal.SIGSTOP)  # still running (its lock held) while the second one starts
        try:
            line = one_error_line(sampler.run(1, args))
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert "in use by another run" in line and f":{first.pid}" in line
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0
    manifest = json.loads((run_dir_of(tmp_path) / "manifest.json").read_text())
    assert len(manifest["sessions"]) == 1 and "finished" in manifest["sessions"][0]
    assert not list(tmp_path.glob(".*.lock"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_resumably_with_exit_3(sampler, tmp_path, sig):
    args = sampler.pixel_args(tmp_path, N, 2, steps=STEPS)
    proc = sampler.start(1, args)
    try:
        sampler.wait_for_files(tmp_path, "*/[0-9]*.png", 1)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, output[-2000:]
    assert "preemption signal received" in output and "KeyboardInterrupt" not in output
    done = len(list(run_dir_of(tmp_path).glob("[0-9]*.png")))
    assert 0 < done < N
    resumed = sampler.run(1, args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} of {N} images present" in resumed.stdout


def test_a_stopped_rank_is_named_by_the_survivor(sampler, tmp_path):
    args = [*sampler.pixel_args(tmp_path, 16, 2, steps=STEPS), "--dist-timeout", "5"]
    proc = sampler.start(2, args)
    workers = []
    try:
        sampler.wait_for_files(tmp_path, "*/[0-9]*.png", 2)
        workers = sampler.worker_pids(proc.pid)
        os.kill(workers[1], signal.SIGSTOP)
        deadline = time.time() + 60
        while Path(f"/proc/{workers[0]}").exists() and time.time() < deadline:  # the survivor gives up
            time.sleep(0.2)
        os.kill(workers[1], signal.SIGKILL)  # spare torchrun its 30 s wait for a stopped process
        output, _ = proc.communicate(timeout=90)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    cause = [line for line in output.splitlines() if "cause:" in line]
    assert cause and "rank 1 stopped making progress" in cause[-1], output[-3000:]


def test_the_first_failing_rank_is_reported(tmp_path, monkeypatch):
    """A survivor whose collective broke names the rank that failed first, with that rank's own line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "_info", None)
    dist.report_failures_in(tmp_path)
    try:
        (tmp_path / ".rank-1.alive").touch()
        assert dist.peer_explanation().startswith("rank 1 stopped making progress")
        (tmp_path / ".rank-1.failed").write_text(f"{time.time() - 1:.3f} error: [rank 1] cannot write x: disk full\n")
        assert dist.peer_explanation() == "rank 1 failed first: error: [rank 1] cannot write x: disk full"
        assert dist._broken_collective(RuntimeError("[gloo] Connection closed by peer"))
        assert not dist._broken_collective(ValueError("bad value"))
        dist.clear_reports(tmp_path)
        assert not list(tmp_path.glob(".rank-*"))
    finally:
        monkeypatch.setattr(dist, "_report_dir", None)


def test_sigusr1_to_the_launcher_reaches_the_workers(sampler, tmp_path):
    """Plain torchrun dies of SIGUSR1 and orphans its workers; launch.torchrun passes it on (exit 3)."""
    args = sampler.pixel_args(tmp_path, 16, 2, steps=STEPS)
    proc = sampler.start(2, args, launcher="launch.torchrun")
    try:
        sampler.wait_for_files(tmp_path, "*/[0-9]*.png", 2)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, output[-3000:]
    assert "preemption signal received" in output


def test_a_model_that_diverges_while_sampling_ends_the_run(sampler, tmp_path):
    """Finite weights whose outputs overflow: one line naming the checkpoint and the first sample, exit 2."""
    import torch

    from models.demo import save_checkpoint, untrained_dit

    net, config = untrained_dit("custom", input_size=8, in_channels=3, num_classes=10, seed=3, depth=2,
                                hidden_size=32, num_heads=2, patch_size=2)
    with torch.no_grad():
        net.final_layer.linear.bias.fill_(3e38)  # finite, but x0 from it overflows to Inf
    ckpt = save_checkpoint(net, config, tmp_path / "overflowing.pt")
    args = sampler.pixel_args(tmp_path / "out", 4, 4, steps=4)
    args[args.index("--ckpt") + 1] = str(ckpt)
    line = one_error_line(sampler.run(1, args))
    assert "overflowing.pt" in line and "NaN or Inf for sample 0" in line
    assert not list((tmp_path / "out").rglob("[0-9]*.png"))



FILE_LIMIT_BYTES = 1024  # the 8-image .npz (about 2 KB) does not fit; the lock file does


def test_pack_only_under_a_file_size_limit_is_one_line_naming_the_npz(finished, sampler, tmp_path):
    """RLIMIT_FSIZE (a quota, `ulimit -f`): the write fails with EFBIG (Python ignores SIGXFSZ, which would kill
    the process); one line naming the .npz, exit 2, no temporary left."""
    sample_dir = copy_of(finished, tmp_path)
    run = run_dir_of(sample_dir)
    Path(f"{run}.npz").unlink()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT_BYTES, FILE_LIMIT_BYTES))

    cmd = [sys.executable, "sample_ddp.py", *sampler.pixel_args(sample_dir, N, 4, steps=4), "--pack-only"]
    result = subprocess.run(cmd, cwd=ROOT, env=sampler_env(), capture_output=True, text=True, timeout=120,
                            preexec_fn=limit)
    assert one_error_line(result) == f"error: cannot write {run}.npz: File too large"
    assert not list(sample_dir.glob(".*tmp*")) and not list(sample_dir.glob(".*.lock"))


def leave_temporaries(run: Path) -> list[Path]:
    """What writers killed midway leave (temporary names as launch.runtime.files.temp_path makes them, of a
    process that is gone): the .npz and metrics beside the folder, a PNG, the grid, the manifest, a probe."""
    dead = "999999999-1"
    paths = [run.parent / f".{run.name}.npz.tmp-{dead}", run.parent / f".{run.name}.metrics.json.tmp-{dead}",
             run / f".000003.png.tmp-{dead}", run / f".grid.png.tmp-{dead}", run / f".manifest.json.tmp-{dead}",
             run / f".write-test.tmp-{dead}"]
    for path in paths:
        path.write_bytes(b"\0" * 4096)
    return paths


@pytest.mark.parametrize("pack_only", [False, True])
def test_a_rerun_removes_what_a_killed_packing_left(finished, sampler, tmp_path, pack_only):
    """A SIGKILL while packing leaves `.<run>.npz.tmp-*` (gigabytes at ImageNet scale): the next run of the same
    command removes it, and every other temporary of the folder, --pack-only included."""
    sample_dir = copy_of(finished, tmp_path)
    run = run_dir_of(sample_dir)
    packed = Path(f"{run}.npz").read_bytes()
    left = leave_temporaries(run)
    extra = ["--pack-only"] if pack_only else []
    result = sampler.run(1, [*sampler.pixel_args(sample_dir, N, 4, steps=4), *extra])
    assert result.returncode == 0, result.stderr
    assert not [p for p in left if p.exists()]
    assert not list(sample_dir.rglob(".*tmp*")) and not list(sample_dir.glob(".*.lock"))
    assert Path(f"{run}.npz").read_bytes() == packed


def test_overwrite_never_deletes_through_a_symbolic_link(finished, sampler, tmp_path):
    """--overwrite with another configuration on a run folder that is a link: refused in one line; the folder
    the link points to keeps every file."""
    real = copy_of(finished, tmp_path / "real")
    target = run_dir_of(real)
    before = sorted(p.name for p in target.iterdir())
    sample_dir = tmp_path / "linked"
    sample_dir.mkdir()
    (sample_dir / target.name).symlink_to(target)
    args = [*sampler.pixel_args(sample_dir, N - 2, 4, steps=4), "--overwrite"]  # another count: another identity
    line = one_error_line(sampler.run(1, args))
    assert line == (f"error: {sample_dir / target.name} is a symbolic link; --overwrite does not delete through "
                    "links: remove the link, or pass the real folder's parent as --sample-dir")
    assert sorted(p.name for p in target.iterdir()) == before
    assert not list(sample_dir.glob(".*.lock"))


def test_a_folder_as_ref_is_refused_at_once(sampler, tmp_path):
    args = sample_ddp.build_parser().parse_args([*sampler.pixel_args(tmp_path / "s", N, 4), "--ref", str(tmp_path)])
    with pytest.raises(UserError) as info:
        config_from_args(args)
    assert str(info.value) == (f"--ref {tmp_path} is a folder; pass the reference batch file (.npz), e.g. one "
                               "built by python -m evaluation.reference")
    assert not (tmp_path / "s").exists()
