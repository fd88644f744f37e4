"""Graceful stop on a preemption warning or an interrupt: SIGUSR1 (SLURM's `--signal=B:USR1@120` forwarded
to the ranks), SIGTERM (a scheduler's or torchrun's stop) and SIGINT (Ctrl-C).

The first signal only sets a flag; the sampler checks it between batches, finishes the PNG writes in flight
and exits with EXIT_PREEMPTED (3) so the batch script knows to requeue the job and a rerun resumes. A second
signal ends the process at once with the same code: every file under a final name is complete (atomic
writes), so that too is resumable.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from launch.runtime.errors import EXIT_PREEMPTED

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_stop = threading.Event()


def _handle(signum: int, frame: object) -> None:
    if _stop.is_set():
        sys.stderr.write(f"{signal.Signals(signum).name} again: stopping now; rerun the same command to resume\n")
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)
    _stop.set()
    sys.stderr.write(f"{signal.Signals(signum).name} received: stopping after the current batch "
                     "(send it again to stop at once)\n")
    sys.stderr.flush()


def install() -> None:
    """Catch the stop signals (main thread only)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)


def requested() -> bool:
    return _stop.is_set()
