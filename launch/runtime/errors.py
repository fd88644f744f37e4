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
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3


class UserError(Exception):
    """Something the user can fix; the message is one line naming the flag or file and what to do."""


class RankError(UserError):
    """A user-fixable failure seen by one rank only (a full disk, a diverged sample)."""
