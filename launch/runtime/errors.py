"""What a command's exit code means, and the one base class of errors a user can fix.

Exit codes of every command (the sbatch scripts requeue on EXIT_PREEMPTED and on nothing else):

    0  done
    1  a rank failed (a bug, or a peer's failure; the line names the rank)
    2  bad input: a flag, file, checkpoint or environment the user can fix; one line says what; never requeued
    3  stopped by a signal after the work in flight was written; rerun the same command to resume

Every error a user can fix derives from `UserError`: its message is ONE line naming the flag or file and what to
do, and `launch.runtime.command.run_command` prints it as `error: <message>` and exits 2. `RankError` is such an
error found by one rank alone (its disk is full, its samples diverged): the line carries the rank and the other
ranks repeat it when their collectives break.

A `UserError` raised inside a DataLoader worker (an unreadable training image, say) reaches the main process
re-made by torch from a message that carries the worker's whole traceback; the error keeps only its own line,
so the command still prints one line and no traceback.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3

# torch.utils.data re-raises a worker's exception as `type(exc)("Caught <Type> in DataLoader worker process
# <n>.\nOriginal Traceback (most recent call last):\n ... \n<module>.<Type>: <message>\n")`
WORKER_WRAPPED = re.compile(r"\ACaught \w+ .*\nOriginal Traceback \(most recent call last\):\n", re.DOTALL)
EXCEPTION_LINE = re.compile(r"\A[\w.]+: (.*)\Z")  # the last line of a traceback: `<module>.<Type>: <message>`


def own_line(message: str) -> str:
    """The error's own one line out of a message that torch wrapped around a worker's traceback; any other
    message unchanged."""
    if not WORKER_WRAPPED.match(message):
        return message
    last = message.rstrip().splitlines()[-1]
    found = EXCEPTION_LINE.match(last)
    return found.group(1) if found else last


class UserError(Exception):
    """Something the user can fix; the message is one line naming the flag or file and what to do."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (own_line(args[0]),)
        super().__init__(*args)


class RankError(UserError):
    """A user-fixable failure seen by one rank only (a full disk, a diverged sample)."""
