"""Graceful stop on a preemption warning or an interrupt: SIGUSR1 (SLURM's `--signal=B:USR1@120` forwarded
to the ranks), SIGTERM (a scheduler's or torchrun's stop) and SIGINT (Ctrl-C).

The first signal only sets a flag; the sampler checks it between batches, finishes the PNG writes in flight
and exits with EXIT_PREEMPTED (3) so the batch script knows to requeue the job and a rerun resumes.

One signal is acted on once, however many copies of it arrive: under srun every process of the step gets
SIGUSR1 (the worker directly, and again through the node's task and the launcher passing it on); a Ctrl-C in
a terminal reaches the worker from the terminal and again from torchrun. So SIGUSR1, a warning, never does
more than set the flag, and a SIGINT or SIGTERM within REPEAT_WINDOW_S of the same signal is taken for a
copy of it. A later SIGINT or SIGTERM (a person pressing Ctrl-C a second time, the scheduler's SIGTERM after
its warning) ends the process at once with the same code: every file under a final name is complete
(atomic writes), so that too is resumable.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from launch.runtime.errors import EXIT_PREEMPTED

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
WARNING_SIGNALS = (signal.SIGUSR1,)  # a repeat of a warning is the same warning: it never stops at once
REPEAT_WINDOW_S = 1.0  # copies of one delivery (srun, torchrun, the node task) arrive within milliseconds

_stop = threading.Event()
_first: list[tuple[int, float]] = []  # the signal that set the flag and when (monotonic)


def _handle(signum: int, frame: object) -> None:
    now = time.monotonic()
    name = signal.Signals(signum).name
    if not _stop.is_set():
        _first[:] = [(signum, now)]
        _stop.set()
        sys.stderr.write(f"{name} received: stopping after the current batch "
                         "(a later SIGINT or SIGTERM stops at once)\n")
        sys.stderr.flush()
        return
    first_signum, first_at = _first[0] if _first else (None, now)
    if signum in WARNING_SIGNALS or (signum == first_signum and now - first_at < REPEAT_WINDOW_S):
        return  # another copy of the signal already acted on
    sys.stderr.write(f"{name} after the stop request: stopping now; rerun the same command to resume\n")
    sys.stderr.flush()
    os._exit(EXIT_PREEMPTED)


def install() -> None:
    """Catch the stop signals (main thread only)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)


def requested() -> bool:
    return _stop.is_set()
