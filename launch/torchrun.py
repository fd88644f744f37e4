"""`python -m launch.torchrun ARGS`: torchrun, made safe to signal and honest about exit codes.

- Exits with the root-cause worker's exit code (3 preempted, 2 bad input, ...) instead of torchrun's 1;
  a worker killed by a signal still gives 1.
- SIGUSR1 sent to this launcher (SLURM's `--signal=USR1@...` without `B:`, or `kill -USR1` on the job's
  main process) is passed on to the workers, which finish their batch and exit 3. Plain torchrun has no
  handler for SIGUSR1: the signal kills it and orphans its workers. SIGTERM and SIGINT are torchrun's own:
  it passes them to the workers (which stop as on SIGUSR1) and kills what is left after 30 s.

The sbatch scripts of launch/slurm/ start every job through it (TORCHRUN overrides).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from launch.runtime.errors import EXIT_FAILED

FORWARDED_SIGNALS = (signal.SIGUSR1,)
SIGNAL_EXIT_BASE = 128  # exit codes above this mean "killed by signal (code - 128)"


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent` (torchrun starts its workers as its own children)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    kids.append(int(entry.name))
    return kids


def _forward(signum: int, frame: object) -> None:
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def main(argv: Sequence[str] | None = None) -> int:
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward)
    try:
        torchrun_main(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return code if 0 < code < SIGNAL_EXIT_BASE else EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
