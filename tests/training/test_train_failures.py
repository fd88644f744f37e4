"""Failures of train.py are one line naming the file, exit 2: damaged resume checkpoints, write errors."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_ARCH, TINY_SIZE, train_env

from models.training import checkpoint_path

FILE_LIMIT_BYTES = 64 * 1024  # config.json and log lines fit; a checkpoint of the tiny model does not


def tiny_argv(image_folder: Path, results: Path, *extra: str) -> list[str]:
    argv = ["--dataset", "folder", "--data-path", str(image_folder), "--image-size", str(TINY_SIZE)]
    for name, value in TINY_ARCH.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    argv += ["--vae", "none", "--no-progress", "--num-workers", "0", "--global-batch-size", "4"]
    return [*argv, "--results-dir", str(results), *extra]


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("cut", ["empty", "half", "tail", "text"])
def test_a_damaged_resume_checkpoint_is_one_line_naming_it(cut, tiny_config, train_run, image_folder, tmp_path, capsys):
    import train

    assert train_run(tiny_config(max_steps=1, ckpt_every=1)) == 0
    blob = checkpoint_path(tiny_config().results_dir, 1).read_bytes()
    bad = tmp_path / f"{cut}.pt"
    contents = {"empty": b"", "half": blob[: len(blob) // 2], "tail": blob[:-10], "text": b"not a checkpoint\n"}
    bad.write_bytes(contents[cut])  # "tail" keeps the zip directory: torch then says [Errno 22] Invalid argument
    capsys.readouterr()
    code = train.main(tiny_argv(image_folder, tmp_path / "run", "--max-steps", "2", "--resume", str(bad)))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"--resume {bad} is truncated, damaged or not a torch checkpoint" in line and "Errno" not in line


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(image_folder, tmp_path):
    """A file-size limit (as a full disk) stops the checkpoint write: one line naming it, nothing half written."""
    results = tmp_path / "run"
    argv = tiny_argv(image_folder, results, "--max-steps", "2", "--ckpt-every", "2")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT_BYTES, FILE_LIMIT_BYTES))

    proc = subprocess.run(
        [sys.executable, "train.py", *argv], cwd=ROOT, env=train_env(), capture_output=True, text=True,
        timeout=120, preexec_fn=limit,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert line == f"error: cannot write {checkpoint_path(results, 2)}: File too large"
    assert list((results / "checkpoints").iterdir()) == []  # neither the checkpoint nor its temporary file
    assert (results / "log.txt").read_text().startswith("step       2 loss")  # what was written stays
    assert json.loads((results / "config.json").read_text())["max_steps"] == 2


def test_an_unwritable_log_is_one_line_naming_it(tiny_config, train_run, capsys):
    cfg = tiny_config(max_steps=1)
    (Path(cfg.results_dir) / "log.txt").mkdir(parents=True)  # a folder where the log file should be
    import train

    code = train.main(tiny_argv(Path(cfg.data_path), Path(cfg.results_dir), "--max-steps", "1"))
    assert code == 2
    assert one_error_line(capsys.readouterr().err) == f"error: cannot write {cfg.results_dir}/log.txt: Is a directory"
