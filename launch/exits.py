"""Exit codes of every command (README "Exit codes"; the sbatch scripts requeue on EXIT_PREEMPTED)."""

EXIT_OK = 0
EXIT_FAILED = 1  # a rank failed with an exception (torchrun then stops the others)
EXIT_BAD_INPUT = 2  # a bad flag, file or environment: one line saying what to fix; never requeued
EXIT_PREEMPTED = 3  # stopped by a signal after finishing in-flight writes; rerun to resume
