"""Fixtures for the launch tests: a fake SLURM (sbatch, srun, scontrol on PATH), a tiny pixel DiT,
locally made Inception weights and the output of one uninterrupted sampling job shared by the tests.

The fake sbatch runs the job in the foreground the way slurmd would: a spooled copy of the script (so the
script cannot find the checkout next to itself), SLURM_* variables, stdout and stderr appended to the file
of its `#SBATCH --output` line. `exec` keeps the PID: the test signals the batch shell itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "launch" / "slurm"
TINY_ARCH = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2)
NUM_CLASSES = 10
IMAGE_SIZE = 8
JOB_TIMEOUT_S = 240
# One configuration for the reference job and the preempted one: 24 images in 6 batches per rank, slow
# enough (100 steps) that SIGUSR1 sent after the first PNGs lands well before the end.
NUM_SAMPLES = 24
BATCH = 2
STEPS = 100
EVAL_IMAGES = 6  # images per batch in the evaluation tests (precision/recall need more than k=3)
EVAL_STEPS = 10

FAKE_SBATCH = r"""#!/usr/bin/env bash
# fake sbatch SCRIPT ARGS...: run the job here, in the foreground, as slurmd would.
set -euo pipefail
script=$1; shift
name=$(sed -n 's/^#SBATCH --job-name=//p' "$script" | head -n 1)
output=$(sed -n 's/^#SBATCH --output=//p' "$script" | head -n 1)
jobid=${FAKE_JOB_ID:-4242}
output=${output//%x/$name}
output=${output//%j/$jobid}
[[ -d "$(dirname "$output")" ]] || { echo "sbatch: output folder of $output missing" >&2; exit 1; }
spool=$FAKE_SLURM_DIR/spool/job$jobid
mkdir -p "$spool"
cp "$script" "$spool/slurm_script"
export SLURM_JOB_ID=$jobid SLURM_JOB_NAME=$name SLURM_SUBMIT_DIR=$PWD
echo "sbatch $*" >>"$FAKE_SLURM_DIR/calls.log"
exec bash "$spool/slurm_script" "$@" >>"$output" 2>&1
"""

FAKE_SRUN = r"""#!/usr/bin/env bash
# fake srun [--opt=value...] CMD...: CMD once per node of SLURM_NNODES, SIGUSR1 forwarded to the tasks,
# exit code the highest of the tasks' (as srun's).
opts=()
while [[ $# -gt 0 && $1 == -* ]]; do opts+=("$1"); shift; done
echo "srun ${opts[*]} $*" >>"$FAKE_SLURM_DIR/calls.log"
pids=()
for ((node = 0; node < ${SLURM_NNODES:-1}; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
trap 'woken=1; kill -s USR1 "${pids[@]}" 2>/dev/null' USR1
rc=0
for pid in "${pids[@]}"; do
  while :; do
    woken=0
    wait "$pid"
    code=$?
    [[ $woken == 1 ]] || break
  done
  (( code > rc )) && rc=$code
done
exit "$rc"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# fake scontrol: `show hostnames LIST` prints $FAKE_HOSTS one per line; `requeue ID` is recorded.
echo "scontrol $*" >>"$FAKE_SLURM_DIR/calls.log"
case "$1" in
  show) [[ $2 == hostnames ]] && printf '%s\n' ${FAKE_HOSTS:-localhost} ;;
  requeue) echo "requeue $2" >>"$FAKE_SLURM_DIR/requeue.log" ;;
  *) exit 1 ;;
esac
"""


@dataclass
class FakeSlurm:
    """A fake SLURM installation in `dir` (bin/ first on PATH) and the environment of a job."""

    dir: Path
    submit_dir: Path
    cache: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "TORCHRUN",
                  "DIT_PROGRAM", "DIT_ROOT", "CUDA_VISIBLE_DEVICES"):
            env.pop(k, None)
        env.update(PATH=f"{self.dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", FAKE_SLURM_DIR=str(self.dir),
                   PYTHON=sys.executable, SLURM_NNODES="1", SLURM_JOB_NODELIST="node1",
                   SLURM_GPUS_ON_NODE="2", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DIT_CPU_THREADS="1",
                   TORCH_HOME=str(self.cache / "torch"), XDG_CACHE_HOME=str(self.cache / "xdg"))
        env.update(extra)
        return env

    def sbatch_cmd(self, script: str, args: list[str]) -> list[str]:
        return ["sbatch", str(SLURM_DIR / script), *args]

    def submit(self, script: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
        """Run the job to its end (like `sbatch --wait`)."""
        full_env = self.env(**env)
        return subprocess.run(self.sbatch_cmd(script, args), cwd=self.submit_dir, env=full_env,
                              capture_output=True, text=True, timeout=JOB_TIMEOUT_S)

    def start(self, script: str, args: list[str], **env: str) -> subprocess.Popen:
        """Start the job; the Popen's PID is the batch shell's."""
        return subprocess.Popen(self.sbatch_cmd(script, args), cwd=self.submit_dir, env=self.env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def log(self, job_name: str, job_id: str) -> str:
        path = self.submit_dir / "logs" / f"{job_name}-{job_id}.out"
        return path.read_text() if path.exists() else f"<no log {path}>"

    def calls(self, name: str = "calls.log") -> list[str]:
        path = self.dir / name
        return path.read_text().splitlines() if path.exists() else []


def make_fake_slurm(tmp_path: Path) -> FakeSlurm:
    bin_dir = tmp_path / "slurm" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    submit_dir = tmp_path / "submit"
    (submit_dir / "logs").mkdir(parents=True)
    return FakeSlurm(tmp_path / "slurm", submit_dir, tmp_path / "cache")


@pytest.fixture
def fake_slurm(tmp_path: Path) -> FakeSlurm:
    return make_fake_slurm(tmp_path)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.demo import save_checkpoint, untrained_dit

    net, config = untrained_dit("custom", input_size=IMAGE_SIZE, in_channels=3, num_classes=NUM_CLASSES,
                                seed=3, **TINY_ARCH)
    return save_checkpoint(net, config, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def sampler_args(ckpt: Path, sample_dir: Path, n: int = NUM_SAMPLES, steps: int = STEPS) -> list[str]:
    return ["--model", "custom", "--ckpt", str(ckpt), "--image-size", str(IMAGE_SIZE), "--vae", "none",
            "--num-classes", str(NUM_CLASSES), "--num-fid-samples", str(n),
            "--per-proc-batch-size", str(BATCH), "--num-sampling-steps", str(steps),
            "--sample-dir", str(sample_dir)]


def run_dir_of(sample_dir: Path) -> Path:
    """The one run folder the sampler made under `sample_dir`."""
    (run,) = [p for p in sample_dir.iterdir() if p.is_dir()]
    return run


@dataclass
class JobResult:
    proc: subprocess.CompletedProcess
    log: str
    run_dir: Path
    calls: list[str]  # the fake SLURM commands it ran

    @property
    def npz(self) -> Path:
        return Path(f"{self.run_dir}.npz")


MULTINODE_JOB_ID = 2002
MULTINODE_ENV = dict(SLURM_NNODES="2", SLURM_GPUS_ON_NODE="1", SLURM_JOB_NODELIST="node[1-2]",
                     FAKE_HOSTS="localhost node2")


@pytest.fixture(scope="session")
def reference_job(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> JobResult:
    """An uninterrupted job: sample_multinode.sbatch on 2 fake nodes x 1 process (gloo, c10d rendezvous)."""
    base = tmp_path_factory.mktemp("reference-job")
    slurm = make_fake_slurm(base)
    sample_dir = base / "samples"
    proc = slurm.submit("sample_multinode.sbatch", sampler_args(tiny_ckpt, sample_dir),
                        FAKE_JOB_ID=str(MULTINODE_JOB_ID), **MULTINODE_ENV)
    log = slurm.log("dit-sample-mn", str(MULTINODE_JOB_ID))
    assert proc.returncode == 0, log[-4000:]
    assert slurm.calls("requeue.log") == []
    return JobResult(proc, log, run_dir_of(sample_dir), slurm.calls())


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from fake_inception import make_random_inception_state

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(make_random_inception_state(), path)
    return path


@pytest.fixture(scope="session")
def ref_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few random 8x8 reference images (ADM layout: arr_0 uint8 NHWC)."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (EVAL_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="session")
def pipeline_job(tiny_ckpt: Path, ref_npz: Path, inception_weights: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> JobResult:
    """sample.sbatch with DIT_PROGRAM="-m launch.pipeline": 2 ranks sample, rank 0 packs and evaluates."""
    base = tmp_path_factory.mktemp("pipeline-job")
    slurm = make_fake_slurm(base)
    sample_dir = base / "samples"
    args = ["--ref", str(ref_npz), "--inception-weights", str(inception_weights), "--eval-batch-size", "8",
            "--no-eval-cache", *sampler_args(tiny_ckpt, sample_dir, n=EVAL_IMAGES, steps=EVAL_STEPS)]
    proc = slurm.submit("sample.sbatch", args, FAKE_JOB_ID="5005", DIT_PROGRAM="-m launch.pipeline")
    log = slurm.log("dit-sample", "5005")
    assert proc.returncode == 0, log[-4000:]
    return JobResult(proc, log, run_dir_of(sample_dir), slurm.calls())
