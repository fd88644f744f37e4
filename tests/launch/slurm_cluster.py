"""A real SLURM cluster on this host, for the tests of launch/slurm/: munge with its own key and socket,
slurmctld, and two slurmd (`slurmd -N`) for two nodes named after names that resolve to this host (the host
name and `localhost`). Every node has fake GPUs (gres files that are links to /dev/null), so the sbatch
scripts run unmodified with `--gpus-per-node=8`; short credential and scheduler intervals let a requeued job
run again within seconds (SLURM's defaults wait 150-180 s). All state lives in one temporary folder; the
daemons run in the foreground as children of this process and are the only processes `stop` ends (after
cancelling the jobs, whose processes slurmstepd ends).

Needs Debian's `munge slurmd slurmctld slurm-client` (`ensure_installed` installs them when root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("munge", "slurmd", "slurmctld", "slurm-client")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
INSTALL_TIMEOUT_S = 600
JOBS_PER_NODE = 4  # whole-node jobs (--gpus-per-node=8 --cpus-per-task=32) that fit on one node at once
GPUS_PER_JOB = 8
CPUS_PER_JOB = 32
CRED_EXPIRE_S = 5  # SLURM's minimum; a requeued job waits this long before it may start again
SCHED_INTERVAL_S = 1
KILL_WAIT_S = 5
MIN_JOB_AGE_S = 3600  # finished jobs stay in `scontrol show job` for the whole test session
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 15
POLL_S = 0.2
MUNGE_KEY_BYTES = 1024
FIRST_JOB_ID_SPAN = 10_000  # job ids start at a random point: clusters of parallel test runs use other ports
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


class Unavailable(Exception):
    """SLURM cannot run here; the message is one line saying why."""


SBIN = "/usr/sbin"  # the daemons' folder, often not on a user's PATH


def command(name: str) -> str | None:
    """The path of a SLURM or munge command, or None."""
    return shutil.which(name) or shutil.which(name, path=SBIN)


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if command(c) is None]


def ensure_installed() -> None:
    """Install the Debian packages when a command is missing (as root, with apt-get), or raise Unavailable.
    The daemons run as root (slurmd starts every job as its user)."""
    if os.geteuid() != 0:
        raise Unavailable("not root: slurmd and munged must run as root")
    if not missing_commands():
        return
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{', '.join(missing_commands())} missing and no apt-get to install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"`{' '.join(cmd)}` failed: {last}")
    if missing_commands():
        raise Unavailable(f"{', '.join(missing_commands())} still missing after installing {' '.join(PACKAGES)}")


def node_names() -> tuple[str, str]:
    """Two node names that resolve to this host: its name and `localhost` (torchrun's rendezvous is given the
    first node's name; slurmd and srun reach both nodes at 127.0.0.1)."""
    host = socket.gethostname().split(".")[0]
    if host == "localhost":
        raise Unavailable("the host is called localhost: the two nodes need two names")
    try:
        socket.gethostbyname(host)
    except OSError as exc:
        raise Unavailable(f"host name {host} does not resolve ({exc}); the nodes are named after it") from exc
    return host, "localhost"


def free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def parse_record(line: str) -> dict[str, str]:
    """One `scontrol -o show job` line as a dict (values never contain spaces, except Command/paths)."""
    record: dict[str, str] = {}
    key = None
    for word in line.split(" "):
        if "=" in word and word.split("=", 1)[0].isalnum():
            key, value = word.split("=", 1)
            record[key] = value
        elif key is not None:
            record[key] += " " + word
    return record


@dataclass
class SlurmCluster:
    """A running cluster: its folder, configuration file and node names, and the daemons it started."""

    dir: Path
    conf: Path
    nodes: tuple[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)
    submit_dirs: set[Path] = field(default_factory=set)
    started_in_s: float = 0.0

    # ------------------------------------------------------------------------------------------- life

    @classmethod
    def start(cls, base: Path | None = None) -> SlurmCluster:
        """Write the configuration into a new folder (world-readable: munged requires it) and start the
        daemons; returns once both nodes are idle."""
        ensure_installed()
        nodes = node_names()
        t0 = time.monotonic()
        folder = Path(tempfile.mkdtemp(prefix="slurm-", dir=base))
        folder.chmod(0o755)
        cluster = cls(folder, folder / "slurm.conf", nodes)
        try:
            cluster._configure()
            cluster._start_daemons()
        except BaseException:
            cluster.stop()
            raise
        cluster.started_in_s = time.monotonic() - t0
        return cluster

    def _configure(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "log", "gpus", *(f"spool-{n}" for n in self.nodes)):
            (d / sub).mkdir()
        (d / "munge").chmod(0o755)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(MUNGE_KEY_BYTES))
        key.chmod(0o400)
        gpus = JOBS_PER_NODE * GPUS_PER_JOB
        for i in range(gpus):  # character devices for slurmd's check; CUDA_VISIBLE_DEVICES comes from them
            (d / "gpus" / f"gpu{i}").symlink_to("/dev/null")
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        first_job = 1 + int.from_bytes(os.urandom(2), "little") % FIRST_JOB_ID_SPAN
        lines = [
            f"ClusterName=dittest{first_job}",
            f"SlurmctldHost={self.nodes[0]}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={d}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool-%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            f"SchedulerParameters=sched_interval={SCHED_INTERVAL_S},bf_interval={SCHED_INTERVAL_S}",
            "SlurmdParameters=config_overrides",  # more CPUs configured than this host has
            "ReturnToService=2",
            f"KillWait={KILL_WAIT_S}",
            f"MinJobAge={MIN_JOB_AGE_S}",
            f"FirstJobId={first_job}",
            "GresTypes=gpu",
            *(f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={JOBS_PER_NODE * CPUS_PER_JOB} Gres=gpu:{gpus} "
              "State=UNKNOWN" for n, p in zip(self.nodes, node_ports)),
            f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        (d / "gres.conf").write_text("".join(f"NodeName={n} Name=gpu File={d}/gpus/gpu[0-{gpus - 1}]\n"
                                             for n in self.nodes))

    def _daemon(self, cmd: list[str], log: str) -> None:
        out = open(self.dir / "log" / log, "ab")  # noqa: SIM115 (kept open for the daemon's lifetime)
        self.daemons.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=self.dir, start_new_session=True))
        out.close()

    def _start_daemons(self) -> None:
        d = self.dir
        self._daemon([command("munged"), "--foreground", f"--key-file={d}/munge/munge.key",
                      f"--socket={d}/munge/munge.socket", f"--pid-file={d}/munge/munged.pid",
                      f"--log-file={d}/munge/munged.log", f"--seed-file={d}/munge/munged.seed"], "munged.out")
        self._wait(lambda: (d / "munge" / "munge.socket").exists(), "munged's socket")
        self._daemon([command("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld.out")
        for node in self.nodes:
            self._daemon([command("slurmd"), "-D", "-f", str(self.conf), "-N", node], f"slurmd-{node}.out")
        self._wait(self._nodes_idle, "both nodes idle")

    def _nodes_idle(self) -> bool:
        proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.daemons:
                if proc.poll() is not None:
                    raise Unavailable(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}: "
                                      f"{self.log_tail()}")
            if predicate():
                return
            time.sleep(POLL_S / 4)
        raise Unavailable(f"timed out waiting for {what}: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        tails = []
        for log in sorted((self.dir / "log").glob("*")):
            text = log.read_text(errors="replace").strip().splitlines()[-lines:]
            tails.append(f"{log.name}: " + " | ".join(text))
        return " // ".join(tails)

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then end the daemons this cluster started (and nothing
        else: left-over job processes are those whose working folder is one this cluster's jobs used)."""
        if self.daemons and all(p.poll() is None for p in self.daemons):
            self.run(["scancel", "--user", "root"], check=False)
            with contextlib.suppress(Unavailable):
                self._wait(lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(), "no jobs",
                           STOP_TIMEOUT_S)
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.daemons:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._kill_leftovers()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        roots = [self.dir.resolve(), *(p.resolve() for p in self.submit_dirs)]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                cwd = Path(os.readlink(entry / "cwd"))
                if any(cwd == r or r in cwd.parents for r in roots):
                    os.kill(int(entry.name), signal.SIGKILL)

    # -------------------------------------------------------------------------------------------- use

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment without SLURM's variables, with this cluster's configuration."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, cmd: list[str], check: bool = True, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env(**env), capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: Path, args: Iterable[str], cwd: Path, options: Iterable[str] = (),
               env: dict[str, str] | None = None) -> str:
        """Submit `script` from `cwd` (the job's working folder); returns the job id."""
        self.submit_dirs.add(cwd)
        cmd = ["sbatch", "--parsable", *options, str(script), *args]
        proc = subprocess.run(cmd, cwd=cwd, env=self.env(**(env or {})), capture_output=True, text=True,
                              timeout=START_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script.name}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job the controller knows (finished ones included), by job id."""
        proc = self.run(["scontrol", "-o", "show", "job"], check=False)
        records = [parse_record(line) for line in proc.stdout.splitlines() if line.startswith("JobId=")]
        return {r["JobId"]: r for r in records}

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """What `--signal=B:USR1@...` does before the time limit: the signal to the batch shell only."""
        self.run(["scancel", f"--signal={sig}", "--batch", job_id])

    def wait(self, job_ids: Iterable[str], timeout: float,
             on_poll: Callable[[dict[str, dict[str, str]]], None] | None = None) -> dict[str, dict[str, str]]:
        """Poll until every job has ended (a requeued job ends only after its last run); returns their
        records. `on_poll` sees the records of every poll (to signal a job when its output shows it running)."""
        job_ids = set(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs()
            if on_poll is not None:
                on_poll(records)
            if all(records.get(j, {}).get("JobState") in TERMINAL_STATES for j in job_ids):
                return {j: records[j] for j in job_ids}
            if time.monotonic() > deadline:
                states = {j: records.get(j, {}).get("JobState") for j in sorted(job_ids)}
                raise TimeoutError(f"jobs not finished after {timeout} s: {states}")
            time.sleep(POLL_S)
