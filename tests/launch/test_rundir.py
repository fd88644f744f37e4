"""Run folders: naming, identity checks, resume scans."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from evaluation.batches import png_is_valid
from launch import rundir
from launch.files import write_json_atomic


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
    assert rundir.prepare(run, {"cfg_scale": 1.5}, overwrite=False)["identity"] == {"cfg_scale": 1.5}
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
