"""The one place where an exception becomes a line and an exit code, for every command of the project.

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)      # an unknown flag: argparse's usage line, exit 2
        return run_command(lambda: config_from(args), work)

`prepare` turns the arguments into a configuration and makes every check that needs no network, no large file
and no collective; `body` does the work. A `UserError` (see launch.runtime.errors) is printed as
`error: <its one line>` and gives exit 2: from `prepare` by rank 0 alone (every rank finds the same), from `body`
by rank 0, or, for a `RankError`, by the rank that found it, which also records it for its peers. When that
happens inside a process group of several ranks, this process leaves at once (another rank may be waiting in a
collective that will never come). A rank other than 0 with an error that every rank finds prints nothing and
waits for the launcher to end it once rank 0 has reported (`wait_for_rank0_to_report`). Warnings print as
`warning: <message>` lines while the command runs. Any other exception is a bug: `dist.install_fail_fast` (or
Python) prints its traceback and the exit code is 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

from launch.runtime import dist
from launch.runtime.errors import EXIT_BAD_INPUT, RankError, UserError

Prepared = TypeVar("Prepared")
RANK0_REPORT_WAIT_S = 60.0  # how long another rank waits for rank 0 to report an error both found (see say_error)


def exit_process(code: int) -> None:
    """Flush and leave now, with no interpreter teardown: a process-group thread destroyed late can abort a
    rank that has finished, and a peer that died leaves destructors that would block."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    return f"warning: {message}\n"


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Warnings as `warning: <message>` lines while a command runs."""
    saved = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        yield
    finally:
        warnings.formatwarning = saved


def say_error(exc: UserError) -> None:
    """Print `error: <line>`: rank 0 for an error every rank shares, the finding rank (named) for a RankError."""
    if isinstance(exc, RankError) and dist.world_size() > 1:
        line = f"error: [rank {dist.rank()}] {exc}"
        dist.record_failure(line)
        print(line, file=sys.stderr, flush=True)
    elif dist.is_main():
        print(f"error: {exc}", file=sys.stderr, flush=True)
    else:
        wait_for_rank0_to_report(exc)


def wait_for_rank0_to_report(exc: UserError) -> None:
    """A rank other than 0 found an error that every rank finds, and rank 0 prints it. Leaving at once could let
    the launcher (torchrun ends every worker when one fails) stop rank 0 before it gets there, while it is still
    starting: the job would end without a word. So wait for the launcher to end this process once rank 0 has
    left (stop signals act at once meanwhile), and print the line here, with the rank, only if it never does."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
    time.sleep(RANK0_REPORT_WAIT_S)
    print(f"error: [rank {dist.rank()}] {exc}", file=sys.stderr, flush=True)


def run_command(prepare: Callable[[], Prepared], body: Callable[[Prepared], int]) -> int:
    """Run a command: `prepare`, then `body` on its result; returns the exit code (see the module docstring)."""
    with one_line_warnings():
        try:
            prepared = prepare()
        except UserError as exc:
            say_error(exc)
            return EXIT_BAD_INPUT
        try:
            return body(prepared)
        except UserError as exc:
            say_error(exc)
            if dist.group_size() > 1:
                exit_process(EXIT_BAD_INPUT)
            return EXIT_BAD_INPUT
        finally:
            dist.shutdown()
