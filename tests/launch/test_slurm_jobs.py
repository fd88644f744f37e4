"""launch/slurm/*.sbatch on a real SLURM cluster (slurm_cluster.py: one host, two nodes, fake GPUs), CPU gloo.

Every job is submitted at once and polled together with the direct runs (no SLURM) they are compared with:
- sample.sbatch (1 node x 2 ranks) and sample_multinode.sbatch (2 nodes x 1 rank), each preempted mid-run
  as SLURM does it (`scancel --signal=USR1 --batch`: the batch shell only), requeued once, ending with the
  .npz of a direct single-process run, byte for byte; every worker acts once on the warning (srun passes it
  to every process of its step, so a worker gets it more than once);
- the pipeline through DIT_PROGRAM, evaluate.sbatch and sweep.sbatch, their .npz and metrics against direct
  runs;
- a bad argument (exit 2, not requeued) and a rank that fails on a 2-node job (the job ends, no requeue).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from conftest import (
    BATCH,
    EVAL_IMAGES,
    EVAL_STEPS,
    NUM_SAMPLES,
    ROOT,
    SLURM_DIR,
    SLURM_SUMMARY,
    run_dir_of,
    sampler_args,
)
from slurm_cluster import SlurmCluster

JOBS_TIMEOUT_S = 600
DIRECT_TIMEOUT_S = 600
SWEEP_STEPS = 5
# The preempted jobs: 24 images in 6 batches per rank, 300 steps (~0.6 s a batch on an idle core), so that
# SIGUSR1 sent once the first PNGs are written lands seconds before the end.
PREEMPT_STEPS = 300
EVAL_METRICS = "is,prec,recall"  # FID's 2048x2048 matrix square roots add a minute of CPU and test nothing here
METRIC_KEYS = ("inception_score", "precision", "recall")
ADM_LINES = {"inception_score": "Inception Score", "precision": "Precision", "recall": "Recall"}
RTOL = 1e-4  # metrics of 2 ranks against 1: features summed in another order
EXIT_BAD_INPUT = 2
FAILED_RANK_WAIT_S = 120  # rank_fails.py's other ranks wait this long unless stopped
RANK_FAILS = Path(__file__).with_name("rank_fails.py")


@dataclass
class Job:
    """One submitted job: where it writes, and once ended its `scontrol show job` record and its log."""

    name: str
    id: str
    sample_dir: Path
    preempt: bool = False
    signalled_at: float | None = None
    record: dict[str, str] = field(default_factory=dict)
    log: str = ""

    @property
    def npz(self) -> Path:
        return Path(f"{run_dir_of(self.sample_dir)}.npz")


@dataclass
class Direct:
    """A run of the same command without SLURM (one process), its output in `log`."""

    proc: subprocess.Popen
    sample_dir: Path
    log: Path

    @property
    def npz(self) -> Path:
        return Path(f"{run_dir_of(self.sample_dir)}.npz")


@dataclass
class Campaign:
    jobs: dict[str, Job]
    direct: dict[str, Direct]
    wall_s: float


def job_env(cluster: SlurmCluster, cache: Path, **extra: str) -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitting environment): the interpreter, the checkout
    first on PYTHONPATH, offline caches, one CPU thread per process."""
    env = cluster.env(PYTHON=sys.executable, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                      DIT_CPU_THREADS="1", TORCH_HOME=str(cache / "torch"), XDG_CACHE_HOME=str(cache / "xdg"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "TORCHRUN",
              "DIT_PROGRAM", "DIT_ROOT", "CUDA_VISIBLE_DEVICES"):
        env.pop(k, None)
    env.update(extra)
    return env


def planned_run_dir(args: list[str]) -> Path:
    """The run folder the sampler will make for these arguments."""
    import sample_ddp
    from sampling.options import config_from_args

    return config_from_args(sample_ddp.build_parser().parse_args(args)).run_dir


def start_direct(cmd: list[str], env: dict[str, str], sample_dir: Path) -> Direct:
    log = Path(f"{sample_dir}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Direct(proc, sample_dir, log)


@pytest.fixture(scope="module")
def campaign(slurm_cluster: SlurmCluster, tiny_ckpt: Path, ref_npz: Path, inception_weights: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    t0 = time.monotonic()
    base = tmp_path_factory.mktemp("slurm-jobs")
    submit = base / "submit"
    (submit / "logs").mkdir(parents=True)
    env = job_env(slurm_cluster, base / "cache")
    eval_args = ["--inception-weights", str(inception_weights), "--metrics", EVAL_METRICS]

    def preempted_args(d: Path) -> list[str]:
        return sampler_args(tiny_ckpt, d, steps=PREEMPT_STEPS)

    def pipeline_args(d: Path) -> list[str]:
        return ["--ref", str(ref_npz), "--eval-batch-size", "8", "--no-eval-cache", *eval_args,
                *sampler_args(tiny_ckpt, d, n=EVAL_IMAGES, steps=EVAL_STEPS)]

    def sweep_args(d: Path) -> list[str]:
        return [*sampler_args(tiny_ckpt, d, n=EVAL_IMAGES, steps=SWEEP_STEPS), "--ref", str(ref_npz),
                "--no-eval-cache", "--shard-size", str(BATCH), "--save", "npz", *eval_args, "--cfg-scales", "1.5,3"]

    jobs: dict[str, Job] = {}

    def submit_job(name: str, script: str, args_of: Callable[[Path], list[str]], options: tuple[str, ...] = (),
                   preempt: bool = False, **extra: str) -> None:
        sample_dir = base / name
        sample_dir.mkdir()
        job_id = slurm_cluster.sbatch(SLURM_DIR / script, args_of(sample_dir), submit, options, {**env, **extra})
        jobs[name] = Job(name, job_id, sample_dir, preempt)

    # the preempted jobs first: they also wait for their requeue
    submit_job("preempted", "sample.sbatch", preempted_args, preempt=True, NPROC="2")
    submit_job("multinode", "sample_multinode.sbatch", preempted_args, ("--nodes=2",), preempt=True, NPROC="1")
    submit_job("pipeline", "sample.sbatch", pipeline_args, NPROC="2", DIT_PROGRAM="-m launch.pipeline")
    # evaluate.sbatch on the pipeline job's .npz, once that job has ended well (SLURM's dependency)
    pipeline_npz = f"{planned_run_dir(pipeline_args(base / 'pipeline'))}.npz"
    submit_job("evaluate", "evaluate.sbatch",
               lambda d: [str(ref_npz), pipeline_npz, "--json", str(d / "metrics.json"), "--batch-size", "8",
                          "--no-cache", *eval_args],
               (f"--dependency=afterok:{jobs['pipeline'].id}", "--kill-on-invalid-dep=yes"), NPROC="2")
    submit_job("sweep", "sweep.sbatch", sweep_args, NPROC="2")
    submit_job("bad-argument", "sample.sbatch", lambda d: sampler_args(tiny_ckpt, d, n=0), NPROC="1")
    submit_job("failed-rank", "sample_multinode.sbatch", lambda d: [], ("--nodes=2",), NPROC="1",
               DIT_PROGRAM=str(RANK_FAILS))

    direct = {
        "sample": start_direct(["sample_ddp.py", *preempted_args(base / "direct-sample")], env, base / "direct-sample"),
        "pipeline": start_direct(["-m", "launch.pipeline", *pipeline_args(base / "direct-pipeline")], env,
                                 base / "direct-pipeline"),
        "sweep": start_direct(["-m", "launch.sweep", *sweep_args(base / "direct-sweep")], env, base / "direct-sweep"),
    }
    ids = {job.id for job in jobs.values()}

    def on_poll(records: dict[str, dict[str, str]]) -> None:
        for job in jobs.values():
            running = records.get(job.id, {}).get("JobState") == "RUNNING"
            if job.preempt and job.signalled_at is None and running and any(job.sample_dir.glob("*/[0-9]*.png")):
                slurm_cluster.signal_batch(job.id)  # as --signal=B:USR1@120 does before the time limit
                job.signalled_at = time.monotonic()

    try:
        records = slurm_cluster.wait(ids, JOBS_TIMEOUT_S, on_poll)
        for run in direct.values():
            run.proc.wait(timeout=DIRECT_TIMEOUT_S)
    except (TimeoutError, subprocess.TimeoutExpired) as exc:
        raise AssertionError(f"{exc}; the jobs' logs are in {submit / 'logs'}") from exc
    finally:
        for run in direct.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
    for job in jobs.values():
        job.record = records[job.id]
        log = submit / "logs" / f"{job.record['JobName']}-{job.id}.out"
        job.log = log.read_text() if log.exists() else f"<no log {log}>"
    for name, run in direct.items():
        assert run.proc.returncode == 0, f"direct {name}: {run.log.read_text()[-3000:]}"
    wall = time.monotonic() - t0
    SLURM_SUMMARY.append(f"real SLURM cluster: {len(jobs)} jobs and {len(direct)} direct runs in {wall:.0f} s")
    return Campaign(jobs, direct, wall)


def ended(job: Job, state: str, exit_code: int, restarts: int) -> None:
    r = job.record
    assert (r["JobState"], r["ExitCode"], r["Restarts"]) == (state, f"{exit_code}:0", str(restarts)), \
        f"{job.name}: {r['JobState']} {r['ExitCode']} restarts {r['Restarts']}\n{job.log[-4000:]}"


def metrics_close(got: dict, expected: dict) -> None:
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=RTOL), (key, got[key], expected[key])


@pytest.mark.parametrize("name, workers", [("preempted", 2), ("multinode", 2)])
def test_a_preempted_job_is_requeued_once_and_completes_the_direct_runs_npz(campaign, name, workers):
    job = campaign.jobs[name]
    ended(job, "COMPLETED", 0, restarts=1)
    first, _, second = job.log.partition("(restart 1)")
    assert second and "(restart 2)" not in second, job.log[-4000:]
    assert job.log.count(f"requeueing job {job.id}") == 1
    # one warning, and each worker acted on it once: no "stopping now", the batch in progress finished
    assert first.count("SIGUSR1 received: stopping after the current batch") == workers, first[-4000:]
    assert "stopping now" not in job.log
    assert first.count("preemption signal received: in-flight images and features written") == 1
    m = re.search(r"(\d+) of (\d+) images present, (\d+) to sample", second)
    assert m, second[-3000:]
    done = int(m.group(1))
    assert 0 < done < NUM_SAMPLES and int(m.group(3)) == NUM_SAMPLES - done  # stopped mid-run, resumed
    assert job.npz.read_bytes() == campaign.direct["sample"].npz.read_bytes()
    assert not list(run_dir_of(job.sample_dir).glob(".*.tmp-*"))


def test_the_multinode_job_meets_on_the_first_host_of_the_allocation(campaign, slurm_cluster):
    job = campaign.jobs["multinode"]
    hosts = slurm_cluster.run(["scontrol", "show", "hostnames", job.record["NodeList"]]).stdout.split()
    assert sorted(hosts) == sorted(slurm_cluster.nodes)
    m = re.search(r"rendezvous at (\S+):(\d+)", job.log)
    assert m and m.group(1) == hosts[0]
    first = job.log.partition("(restart 1)")[0]
    assert first.count("--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d") == 2  # one torchrun per node
    # srun passed the warning to each node's task too (every process of its step gets it)
    assert first.count("SIGUSR1 (preemption warning)") == 1 + 2
    manifest = json.loads((run_dir_of(job.sample_dir) / "manifest.json").read_text())
    assert [s["world_size"] for s in manifest["sessions"]] == [2, 2]


def test_the_pipeline_job_writes_the_direct_runs_npz_and_its_metrics(campaign, ref_npz):
    job, direct = campaign.jobs["pipeline"], campaign.direct["pipeline"]
    ended(job, "COMPLETED", 0, restarts=0)
    assert "2 process(es)" in job.log
    assert job.npz.read_bytes() == direct.npz.read_bytes()
    report = json.loads(Path(f"{run_dir_of(job.sample_dir)}.metrics.json").read_text())
    expected = json.loads(Path(f"{run_dir_of(direct.sample_dir)}.metrics.json").read_text())
    assert (report["world_size"], expected["world_size"]) == (2, 1)
    assert report["reference_batch"] == str(ref_npz.resolve())
    metrics_close(report, expected)
    for key, name in ADM_LINES.items():  # rank 0 printed ADM's lines, and they are the file's numbers
        m = re.search(rf"^{name}: (\S+)$", job.log, flags=re.M)
        assert m and float(m.group(1)) == pytest.approx(report[key], rel=1e-12), name


def test_evaluate_job_on_the_pipeline_jobs_npz_agrees_with_the_direct_pipeline(campaign):
    job = campaign.jobs["evaluate"]
    ended(job, "COMPLETED", 0, restarts=0)
    report = json.loads((job.sample_dir / "metrics.json").read_text())
    expected = json.loads(Path(f"{run_dir_of(campaign.direct['pipeline'].sample_dir)}.metrics.json").read_text())
    assert report["world_size"] == 2 and "[rank 1]" in job.log
    metrics_close(report, expected)


def test_sweep_job_gives_the_direct_sweeps_points(campaign):
    job, direct = campaign.jobs["sweep"], campaign.direct["sweep"]
    ended(job, "COMPLETED", 0, restarts=0)
    rows = json.loads((job.sample_dir / "sweep.json").read_text())["points"]
    expected = json.loads((direct.sample_dir / "sweep.json").read_text())["points"]
    assert [r["cfg_scale"] for r in rows] == [r["cfg_scale"] for r in expected] == [1.5, 3.0]
    for row, want in zip(rows, expected):
        metrics_close(row, want)
        assert Path(f"{row['run_dir']}.npz").read_bytes() == Path(f"{want['run_dir']}.npz").read_bytes()
    assert "sweep point 2/2" in job.log


def test_a_bad_argument_fails_with_exit_2_and_is_not_requeued(campaign):
    job = campaign.jobs["bad-argument"]
    ended(job, "FAILED", EXIT_BAD_INPUT, restarts=0)
    errors = [line for line in job.log.splitlines() if line.startswith("error: ")]
    assert errors and all("--num-fid-samples" in line for line in errors), job.log[-3000:]
    assert "requeueing" not in job.log


def test_a_failed_rank_ends_the_two_node_job_without_a_requeue(campaign):
    job = campaign.jobs["failed-rank"]
    # 1, not 143: the other node's task either outlived srun's SIGTERM (--kill-on-bad-exit) and reported 1,
    # or its torchrun failed by itself on losing the rendezvous store the failed node held
    ended(job, "FAILED", 1, restarts=0)
    start, end = (datetime.fromisoformat(job.record[k]) for k in ("StartTime", "EndTime"))
    assert (end - start).total_seconds() < FAILED_RANK_WAIT_S / 2  # the waiting rank was stopped, not awaited
    assert "rank 1 fails" in job.log and "requeueing" not in job.log


def test_sbatch_test_only_accepts_the_scripts_and_names_a_request_the_site_cannot_meet(slurm_cluster):
    """What the README advises before queueing a job: `sbatch --test-only` with the resource lines."""
    for script in ("sample.sbatch", "sample_multinode.sbatch", "evaluate.sbatch", "sweep.sbatch"):
        proc = slurm_cluster.run(["sbatch", "--test-only", str(SLURM_DIR / script)], check=False)
        assert proc.returncode == 0 and "to start at" in proc.stderr, (script, proc.stderr)
    too_many = slurm_cluster.run(["sbatch", "--test-only", "--gpus-per-node=9999", str(SLURM_DIR / "sample.sbatch")],
                                 check=False)
    assert too_many.returncode != 0 and "Requested node configuration is not available" in too_many.stderr
    no_gres = slurm_cluster.run(["sbatch", "--test-only", "--gres=tpu:1", str(SLURM_DIR / "sample.sbatch")],
                                check=False)
    assert no_gres.returncode != 0 and "Invalid generic resource (gres) specification" in no_gres.stderr
