"""launch.runtime.preempt in a child process sent real signals: one signal is acted on once however many copies
arrive (srun passes SIGUSR1 to every process of its step, and the node task and the launcher pass it on
again); a later SIGINT or SIGTERM, like a person's second Ctrl-C, still stops at once. The jobs under a real
srun: test_slurm_jobs.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT

from launch.runtime.preempt import REPEAT_WINDOW_S

EXIT_PREEMPTED = 3
TIMEOUT_S = 60
APART_S = 1.5 * REPEAT_WINDOW_S  # two separate signals
# The child: install the handlers, then send itself SIGNALS (name, pause after it in s), then report.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from launch.runtime import preempt
    preempt.install()
    for name, pause in {signals!r}:
        os.kill(os.getpid(), getattr(signal, name))
        time.sleep(pause)
    print(f"still running, requested={{preempt.requested()}}", flush=True)
""")


def send(signals: list[tuple[str, float]]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD.format(signals=signals)], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def received(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if " received: " in line]


def test_copies_of_one_warning_are_acted_on_once():
    proc = send([("SIGUSR1", 0.0), ("SIGUSR1", 0.0), ("SIGUSR1", 0.05)])  # as under srun: 1 to 3 copies
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "still running, requested=True"
    assert received(proc) == ["SIGUSR1 received: stopping after the current batch "
                              "(a later SIGINT or SIGTERM stops at once)"]
    assert "stopping now" not in proc.stderr


def test_a_repeated_warning_never_stops_at_once_even_much_later():
    proc = send([("SIGUSR1", APART_S), ("SIGUSR1", 0.05)])
    assert proc.returncode == 0 and len(received(proc)) == 1, proc.stderr


def test_copies_of_one_interrupt_are_acted_on_once():
    """Ctrl-C in a terminal reaches the worker from the terminal and again from torchrun."""
    for name in ("SIGINT", "SIGTERM"):
        proc = send([(name, 0.0), (name, 0.05)])
        assert proc.returncode == 0, proc.stderr
        assert [line.split()[0] for line in received(proc)] == [name]


def test_a_second_interrupt_later_stops_at_once():
    proc = send([("SIGINT", APART_S), ("SIGINT", TIMEOUT_S / 2)])  # a person pressing Ctrl-C twice
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == ("SIGINT after the stop request: stopping now; rerun the same command "
                                            "to resume")


def test_an_interrupt_after_the_warning_stops_at_once():
    """The scheduler's SIGTERM at the time limit, after its SIGUSR1 warning, or a Ctrl-C: no need to wait."""
    proc = send([("SIGUSR1", 0.05), ("SIGTERM", TIMEOUT_S / 2)])
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert "SIGTERM after the stop request: stopping now" in proc.stderr
