"""sample.sbatch on one node with 2 ranks, preempted as SLURM does it (SIGUSR1 to the batch shell); the
requeued job (same id) resumes and ends with the .npz of an uninterrupted job (2 nodes x 1 rank), byte
for byte."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
from conftest import JOB_TIMEOUT_S, NUM_SAMPLES, run_dir_of, sampler_args, wait_for
from PIL import Image

EXIT_PREEMPTED = 3


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()  # raises on a truncated file
        return np.asarray(im.convert("RGB"))


def test_sigusr1_stops_requeues_and_the_requeued_job_completes_the_same_npz(fake_slurm, tiny_ckpt,
                                                                            reference_job, tmp_path):
    job_id = "3003"
    sample_dir = tmp_path / "samples"
    args = sampler_args(tiny_ckpt, sample_dir)
    job = fake_slurm.start("sample.sbatch", args, FAKE_JOB_ID=job_id)
    try:
        wait_for(lambda: any(sample_dir.glob("*/[0-9]*.png")), JOB_TIMEOUT_S, "the first PNG")
        os.kill(job.pid, signal.SIGUSR1)  # --signal=B:USR1: to the batch shell only
        code = job.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
    log = fake_slurm.log("dit-sample", job_id)
    assert code == EXIT_PREEMPTED, log[-4000:]
    assert fake_slurm.calls("requeue.log") == [f"requeue {job_id}"]
    assert "SIGUSR1" in log and "preemption signal received" in log
    assert "2 process(es)" in log and "--standalone --nproc_per_node=2" in log

    run = run_dir_of(sample_dir)
    written = sorted(run.glob("[0-9]*.png"))
    assert 0 < len(written) < NUM_SAMPLES, len(written)
    assert not list(run.glob(".*.tmp-*"))  # the writes in flight were finished, none abandoned
    assert not Path(f"{run}.npz").exists()
    reference = reference_job.run_dir
    for png in written:  # every file decodes completely and is the image the uninterrupted job drew
        np.testing.assert_array_equal(decode(png), decode(reference / png.name))

    # the requeued job: same id, same command
    proc = fake_slurm.submit("sample.sbatch", args, FAKE_JOB_ID=job_id, SLURM_RESTART_COUNT="1")
    log = fake_slurm.log("dit-sample", job_id)
    assert proc.returncode == 0, log[-4000:]
    assert "restart 1" in log
    m = re.search(r"(\d+) of (\d+) images present, (\d+) to sample", log.split("restart 1", 1)[1])
    assert m and (int(m.group(1)), int(m.group(3))) == (len(written), NUM_SAMPLES - len(written))
    assert fake_slurm.calls("requeue.log") == [f"requeue {job_id}"]  # no second requeue
    assert Path(f"{run}.npz").read_bytes() == reference_job.npz.read_bytes()
