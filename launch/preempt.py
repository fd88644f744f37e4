"""Graceful stop on a preemption warning (SLURM's `--signal=B:USR1@120` forwarded to the ranks).

The handler only sets a flag; the sampler checks it between batches, finishes the PNG writes
in flight and exits with EXIT_PREEMPTED so the batch script knows to requeue the job.
"""

from __future__ import annotations

import signal
import threading

from launch.exits import EXIT_PREEMPTED  # noqa: F401 - re-exported for the sampler

STOP_SIGNALS = (signal.SIGUSR1,)

_stop = threading.Event()


def install() -> None:
    """Catch the stop signals (main thread only)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: _stop.set())


def requested() -> bool:
    return _stop.is_set()


def request() -> None:
    """Ask for a stop from code (tests, or a custom signal handler)."""
    _stop.set()
