"""Run folders: naming, identity checks, resume scans."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from evaluation.batches import png_is_valid
from launch.runtime import rundir
from launch.runtime.files import write_json_atomic


def test_run_name_extends_the_official_name():
    assert rundir.run_name("DiT-XL/2", None, 256, "ema", 1.5, 0, "ddpm", 250) == (
        "DiT-XL-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0-ddpm-250")
    assert rundir.run_name("DiT-B/4", "/x/0400000.pt", 512, "mse", 4.0, 7, "ddim", 50).startswith(
        "DiT-B-4-0400000-size-512-vae-mse-cfg-4.0-seed-7")


def test_prepare_refuses_another_identity_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    assert rundir.prepare(run, {"cfg_scale": 1.5}, overwrite=False) is None
    write_json_atomic(run / rundir.MANIFEST_NAME, {"identity": {"cfg_scale": 1.5}})
    (run / "000000.png").write_bytes(b"x")
    assert rundir.prepare(run, {"cfg_scale": 1.5}, overwrite=False).identity == {"cfg_scale": 1.5}
    with pytest.raises(rundir.RunDirError, match="cfg_scale 1.5 -> 4.0.*--overwrite"):
        rundir.prepare(run, {"cfg_scale": 4.0}, overwrite=False)
    assert (run / "000000.png").exists()  # nothing lost by a refusal
    assert rundir.prepare(run, {"cfg_scale": 4.0}, overwrite=True) is None
    assert not (run / "000000.png").exists()


def test_folder_without_manifest_is_not_adopted(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "mine.txt").write_text("precious")
    with pytest.raises(rundir.RunDirError, match="not empty and has no manifest.json"):
        rundir.prepare(run, {}, overwrite=False)


def test_scan_finds_missing_and_truncated_pngs_per_rank(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    for i in (0, 1, 3, 4):
        Image.fromarray(img).save(tmp_path / f"{i:06d}.png")
    data = (tmp_path / "000003.png").read_bytes()
    (tmp_path / "000003.png").write_bytes(data[: len(data) // 2])
    name = lambda i: f"{i:06d}.png"  # noqa: E731
    found = [rundir.scan_missing(tmp_path, 6, 2, r, name, png_is_valid) for r in range(2)]
    assert sorted(found[0] + found[1]) == [2, 3, 5]
    assert found[0] == [2] and found[1] == [3, 5]
    assert not (tmp_path / "000003.png").exists()


def test_overwrite_with_the_same_identity_resumes(tmp_path):
    """A job script that keeps --overwrite across requeues never wipes its own progress."""
    run = tmp_path / "run"
    rundir.prepare(run, {"cfg_scale": 1.5}, overwrite=True)
    write_json_atomic(run / rundir.MANIFEST_NAME, {"identity": {"cfg_scale": 1.5}})
    (run / "000000.png").write_bytes(b"x")
    assert rundir.prepare(run, {"cfg_scale": 1.5}, overwrite=True).identity == {"cfg_scale": 1.5}
    assert (run / "000000.png").read_bytes() == b"x"


def test_damaged_manifest_keeps_the_images_and_does_not_advise_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.MANIFEST_NAME).write_text("{not json")
    (run / "000000.png").write_bytes(b"x")
    with pytest.raises(rundir.RunDirError) as err:
        rundir.prepare(run, {"cfg_scale": 1.5}, overwrite=False)
    message = str(err.value)
    assert "damaged" in message and "1 images" in message and "--overwrite" not in message and "\n" not in message
    assert (run / "000000.png").exists()


def test_manifest_has_one_owner_and_sessions(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    manifest = rundir.Manifest(run, {"identity": {"a": 1}})
    manifest.start_session(world_size=2)
    manifest.finish_session()
    manifest.start_session(world_size=4)
    again = rundir.Manifest.read(run)
    assert [s["world_size"] for s in again.data["sessions"]] == [2, 4]
    assert "finished" in again.data["sessions"][0] and "finished" not in again.data["sessions"][1]
    assert not list(run.glob(".*tmp*"))


def test_a_second_run_on_the_folder_is_refused_naming_the_holder(tmp_path, monkeypatch):
    import os
    import socket

    run = tmp_path / "run"
    first = rundir.RunLock(run)
    rundir.prepare(run, {"a": 1}, overwrite=False, lock=first)
    with pytest.raises(rundir.RunDirError, match=f"in use by another run \\({socket.gethostname()}:{os.getpid()}"):
        rundir.prepare(run, {"a": 1}, overwrite=False, lock=rundir.RunLock(run))
    first.release()
    second = rundir.RunLock(run)
    rundir.prepare(run, {"a": 1}, overwrite=False, lock=second)
    assert second.held
    second.release()
    assert not list(tmp_path.glob(".*.lock"))


def test_stale_locks_are_taken_over(tmp_path, monkeypatch):
    import json
    import os
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    lock = rundir.RunLock(run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "job": None}))
    lock.acquire()  # its process is gone
    lock.release()
    lock.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock.acquire()  # an earlier run of this same (requeued) job on another node
    lock.release()
    monkeypatch.delenv("SLURM_JOB_ID")
    lock.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": "5"}))
    with pytest.raises(rundir.RunDirError, match="elsewhere:1"):
        lock.acquire()
    old = lock.path.stat().st_mtime - rundir.LOCK_STALE_S - 1
    os.utime(lock.path, (old, old))
    lock.acquire()  # silent for too long
    assert lock.held
