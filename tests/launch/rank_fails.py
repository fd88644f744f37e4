"""A program for the failed-rank job (DIT_PROGRAM): rank 1 fails at once; every other rank waits, as a rank
blocked in a collective with the failed one would, until it is stopped."""

import os
import sys
import time

FAILING_RANK = 1
EXIT_FAILED = 1
WAIT_S = 120  # far longer than the job may take: the test sees the job end because the waiting rank was stopped

if int(os.environ["RANK"]) == FAILING_RANK:
    print(f"rank {FAILING_RANK} fails", file=sys.stderr, flush=True)
    sys.exit(EXIT_FAILED)
time.sleep(WAIT_S)
