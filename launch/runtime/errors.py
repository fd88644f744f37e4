"""Exit codes of every command (README "Exit codes"; the sbatch scripts requeue on EXIT_PREEMPTED)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILED = 1  # a rank failed with an exception (torchrun then stops the others)
EXIT_BAD_INPUT = 2  # a bad flag, file or environment: one line saying what to fix; never requeued
EXIT_PREEMPTED = 3  # stopped by a signal after finishing in-flight writes; rerun to resume


def exit_code_of(body: Callable[[], int], errors: tuple[type[BaseException], ...]) -> int:
    """Run a command's body; one of `errors` (bad input or environment) becomes `error: <its one line>` on
    stderr and EXIT_BAD_INPUT. Other exceptions propagate (a bug: a traceback and exit 1)."""
    try:
        return body()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def exit_process(code: int) -> None:
    """Flush and leave now, with no interpreter teardown: a process-group thread destroyed late can abort a
    rank that has finished, and a peer that died leaves destructors that would block."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
